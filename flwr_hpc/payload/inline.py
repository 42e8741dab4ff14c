"""The ``inline`` payload store: objects travel inside the task and its result.

For sites with no storage the server can reach. Each task carries every object it needs
(the message tree, the node's Context and the FAB) base64-encoded in its JSON arguments,
and the worker returns the reply objects in its JSON result. Sizes are *measured* with the
real ``ComputeSerializer`` before submission: a task at or above ``max_task_bytes`` (default
8 MB, below Globus Compute's 10 MB submit limit) is refused with a message that says to use
a shared store, instead of poisoning the site's Executor. Results are bounded by the
endpoint's 10 MiB result limit: a reply whose result would exceed ``max_result_bytes``
(default 6 MiB, measured with the same serializer) becomes a *file reply* -- the worker writes
its objects under ``payload.path`` at the site and returns only their ids; the server reads
them from that directory (a path it shares with the site) or, when the site also names a
Globus collection, fetches them in one Transfer task. Without ``payload.path`` the reply is
an error that says so. Every object is still verified by sha256 when read.
"""

from __future__ import annotations

import base64
import threading
from collections.abc import Iterable
from typing import Any

from flwr_hpc.errors import PayloadMissingError
from flwr_hpc.payload.objects import ObjectData, check_object_id, join_parts, verify_object
from flwr_hpc.payload.store import StoreDefaults

DEFAULT_MAX_TASK_BYTES = 8_000_000
DEFAULT_MAX_RESULT_BYTES = 6 * 2**20


def encode(objects: dict[str, bytes]) -> dict[str, str]:
    """``{object_id: bytes}`` as ``{object_id: base64 text}``, for a JSON job or result."""
    return {oid: base64.b64encode(data).decode("ascii") for oid, data in objects.items()}


def decode(objects: dict[str, str]) -> dict[str, bytes]:
    """The inverse of :func:`encode`; raises on a key that is not an object id."""
    return {check_object_id(oid): base64.b64decode(text) for oid, text in objects.items()}


class InlineStore(StoreDefaults):
    """Server side: the objects staged for a site's tasks, bundled into each task."""

    def __init__(self, site: str = "", max_task_bytes: int = DEFAULT_MAX_TASK_BYTES,
                 max_result_bytes: int = DEFAULT_MAX_RESULT_BYTES, *,
                 reply_path: str | None = None, reply_store: Any = None) -> None:
        self.site = site
        self.max_task_bytes = max_task_bytes
        self.max_result_bytes = max_result_bytes
        self.reply_path = reply_path    # file replies, as the site sees the directory
        self.reply_store = reply_store  # ... and as the server reaches it
        self._objects: dict[str, bytes] = {}
        self._lock = threading.Lock()

    def spec(self) -> dict[str, Any]:
        """``{"type": "inline", "site", "max_result_bytes", "reply_path"}``: what the
        site's side of the store needs.
        """
        return {"type": "inline", "site": self.site, "max_result_bytes": self.max_result_bytes,
                "reply_path": self.reply_path}

    def fetch_file_reply(self, object_ids: list[str], label: str) -> None:
        """A file reply's objects: fetched by Transfer if the site is reached that way."""
        if self.reply_store is None:
            raise PayloadMissingError(object_ids[0] if object_ids else "?" * 64,
                                      f"site '{self.site}' (inline): a file reply, but "
                                      "payload.path is not set")
        self.reply_store.receive({}, object_ids, label)

    def has(self, object_id: str) -> bool:
        """Whether the object is staged here (file replies are not counted)."""
        return object_id in self._objects

    def put(self, object_id: str, data: ObjectData, *, trusted: bool = False) -> int:
        """Keep the object in memory (verified first unless ``trusted``); return its
        size, or 0 if it was already held.
        """
        data = join_parts(data)
        check_object_id(object_id)
        if not trusted:
            verify_object(object_id, data, f"site '{self.site}' (inline)")
        with self._lock:
            if object_id in self._objects:
                return 0
            self._objects[object_id] = data
        return len(data)

    def get(self, object_id: str) -> bytes:
        """The object's verified bytes: held here, else read from the file-reply store;
        raises :class:`PayloadMissingError` if neither has it.
        """
        data = self._objects.get(check_object_id(object_id))
        if data is None and self.reply_store is not None:
            return self.reply_store.get(object_id)  # a file reply (verified there)
        if data is None:
            raise PayloadMissingError(object_id, f"site '{self.site}' (inline)")
        return verify_object(object_id, data, f"site '{self.site}' (inline)")

    def attach(self, job: dict[str, Any], object_ids: list[str]) -> None:
        """The objects travel inside the task; a task over ``max_task_bytes`` serialized
        is refused before it is submitted (Globus Compute refuses submissions over
        10 MB, and a refused submit poisons the Executor).
        """
        from flwr_hpc.protocol import task_serializer

        job["objects"] = self.bundle(object_ids)
        size = len(task_serializer().serialize((job,)))
        if size >= self.max_task_bytes:
            raise RuntimeError(
                f"the task is {size:,} bytes serialized, over the inline store's limit of "
                f"{self.max_task_bytes:,} (Globus Compute refuses submissions over 10 MB); "
                "give this site a store it reads by itself (payload.type: shared-fs or "
                "globus-transfer)")

    def receive(self, result: dict[str, Any], object_ids: list[str], label: str) -> None:
        """The objects came back inside the result, or as a file reply (fetched whole,
        in one go, whichever of its objects is asked for first).
        """
        if result.get("objects"):
            self.ingest(result["objects"])
        if result.get("file_reply"):
            self.fetch_file_reply(list(result.get("object_ids") or object_ids), label)

    def bundle(self, object_ids: Iterable[str]) -> dict[str, str]:
        """The base64 objects a task carries."""
        return encode({oid: self.get(oid) for oid in dict.fromkeys(object_ids)})

    def ingest(self, objects: dict[str, str]) -> None:
        """Objects a task returned (verified again when read)."""
        for oid, data in decode(objects).items():
            with self._lock:
                self._objects[oid] = data


class InlineSiteStore(StoreDefaults):
    """Site side: reads the task's objects, collects what the worker writes for the result."""

    carries_objects = True

    def finish(self, result: dict[str, Any], job: dict[str, Any]) -> str | None:
        """The reply travels back inside the result. Measured with the task serializer,
        a result over the endpoint's limit is written to ``reply_path`` instead (a file
        reply); without one, the reason is returned.
        """
        from flwr_hpc.payload.store import open_store
        from flwr_hpc.protocol import task_serializer

        result["objects"] = encode(self.outbox)
        limit = int(job["store"].get("max_result_bytes") or DEFAULT_MAX_RESULT_BYTES)
        size = len(task_serializer().serialize(result))
        if size < limit:
            return None
        reply_path = job["store"].get("reply_path")
        if not reply_path:
            return (f"the reply is {size:,} bytes serialized, over the inline result limit "
                    f"of {limit:,} (payload.max_result_bytes; Globus Compute refuses results "
                    "over 10 MiB): set payload.path to a directory for file replies at this "
                    "site (shared with the server, or reached by Transfer with "
                    "payload.collection_id)")
        files = open_store({"type": "filesystem", "path": reply_path, "site": self.site})
        for oid, data in self.outbox.items():
            files.put(oid, data)
        del result["objects"]
        result["file_reply"] = True
        return None

    def __init__(self, objects: dict[str, str], site: str = "") -> None:
        self.site = site
        self._objects = decode(objects)
        self.outbox: dict[str, bytes] = {}

    def spec(self) -> dict[str, Any]:
        """``{"type": "inline", "site"}``."""
        return {"type": "inline", "site": self.site}

    def has(self, object_id: str) -> bool:
        """Whether the task carried the object or the worker has written it."""
        return object_id in self._objects or object_id in self.outbox

    def get(self, object_id: str) -> bytes:
        """The object's verified bytes, from the task's objects or the outbox."""
        oid = check_object_id(object_id)
        data = self._objects.get(oid, self.outbox.get(oid))
        if data is None:
            raise PayloadMissingError(oid, f"site '{self.site}' (inline task)")
        return verify_object(oid, data, f"site '{self.site}' (inline task)")

    def put(self, object_id: str, data: ObjectData, *, trusted: bool = False) -> int:
        """Add the object to the outbox that :meth:`finish` puts into the result
        (verified first unless ``trusted``); return its size.
        """
        data = join_parts(data)
        check_object_id(object_id)
        if not trusted:
            verify_object(object_id, data, f"site '{self.site}' (inline task)")
        self.outbox[object_id] = data
        return len(data)
