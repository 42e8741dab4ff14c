"""Payload stores: where a site's objects live.

A store is one site's object space (a storage collection, a shared filesystem path, or a
local directory standing in for either). Both the server and the site worker open it from
the same small ``spec`` dict, so a task carries only a reference, never the bytes.

Guarantees of every store:
- writes are atomic (temp file, rename): a reader never sees a partial object. The bytes
  are not forced to disk (``fsync``) unless the store is opened with ``fsync=True``: every
  read verifies the sha256, so an object torn by a machine crash is caught and
  quarantined, never used, and a flush per object would cost more than the whole
  transfer on a parallel filesystem;
- an object is stored only if its bytes hash to its id (checked, unless the caller has just
  computed the id from the same bytes: ``trusted=True``);
- every read is verified against the id; a mismatching object is quarantined (moved aside,
  so a later stage can replace it) and :class:`PayloadIntegrityError` is raised;
- ids are validated as hex sha256 before any path is built from them.
"""

from __future__ import annotations

import base64
import os
import threading
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from flwr_hpc.errors import PayloadIntegrityError, PayloadMissingError
from flwr_hpc.payload.objects import (
    ObjectData,
    check_object_id,
    data_len,
    verify_object,
    write_data,
)


class PayloadStore(Protocol):
    """A site's payload store as the server uses it. Every kind (filesystem, inline,
    Globus Transfer) implements the whole protocol, most of it with the do-nothing
    defaults of :class:`StoreDefaults`, so no code outside ``payload/`` asks which kind
    of store it holds.
    """

    site: str
    # replies are fetched in one batch per site once its tasks of a phase are done
    batch_fetch: bool

    def flush(self, label: str) -> Any:
        """Make what was ``put`` since the last flush readable at the site (one transfer
        for a Transfer store); returns a report or None.
        """

    def attach(self, job: dict[str, Any], object_ids: list[str]) -> None:
        """Add to a task's ``job`` what the site needs to read ``object_ids`` (an inline
        store: the objects themselves); raises if the job would be too large.
        """

    def prestage(self, objects: Mapping[str, ObjectData], label: str) -> Any:
        """Move ``objects`` to the site ahead of the message that will need them (a
        Transfer store); returns a report, or None when there was nothing to do.
        """

    def receive(self, result: dict[str, Any], object_ids: list[str], label: str) -> None:
        """Make ``object_ids`` of a task's ``result`` readable here (inline: the objects
        the result carries; Transfer: one transfer from the site).
        """

    def spec(self) -> dict[str, Any]:
        """Plain-JSON description from which :func:`open_store` reopens this store."""

    def has(self, object_id: str) -> bool:
        """Whether the store holds ``object_id`` (not verified: :meth:`get` does that)."""
        ...

    def put(self, object_id: str, data: ObjectData, *, trusted: bool = False) -> int:
        """Store ``data`` (one buffer, or a tuple of buffers to concatenate) under
        ``object_id``; return bytes written (0 if already held).
        ``trusted``: the caller just computed ``object_id`` from these bytes (Flower's
        object ids are the sha256 of ``deflate()``), so the store skips hashing them again.
        Readers verify every object regardless.
        """

    def get(self, object_id: str) -> bytes:
        """Return the verified bytes of ``object_id``."""

    def reply_size(self, object_id: str) -> int | None:
        """The size of a reply object that :meth:`get` can read later, without reading it
        now; None where the store cannot promise that (the reply is then read at once).
        """

    def for_reply(self, scope: str | None, pack: Any = None) -> PayloadStore:
        """Server side: where the objects of the reply a task's result names by
        ``reply_scope`` (and, for a packed reply, its ``reply_pack`` index) are read
        (:class:`ReplyScope` of a filesystem store; the store itself elsewhere, and for
        ``None``).
        """
        ...


class StoreDefaults:
    """The do-nothing parts of :class:`PayloadStore` (and of the site's view of a store,
    :func:`open_store`): a store both ends read directly.
    """

    batch_fetch = False
    # site side: the objects travel inside the task and its result (nothing on disk, so
    # nothing worth caching across tasks either)
    carries_objects = False

    def finish(self, result: dict[str, Any], job: dict[str, Any]) -> str | None:
        """Site side, after the reply is written: put what the server must read into
        ``result``; returns why it cannot (the task then fails), or None.
        """
        return None

    def flush(self, label: str) -> Any:
        """Nothing to make readable: both ends read the store directly; returns None."""
        return None

    def attach(self, job: dict[str, Any], object_ids: list[str]) -> None:
        """Nothing to add: the site reads the objects from the store itself."""
        return None

    def prestage(self, objects: Mapping[str, ObjectData], label: str) -> Any:
        """Nothing to gain: the site reads the server's writes as they are made."""
        return None

    def receive(self, result: dict[str, Any], object_ids: list[str], label: str) -> None:
        """Nothing to receive: the site wrote the objects where the server reads them."""
        return None

    def reply_size(self, object_id: str) -> int | None:
        """Unknown: replies are read when they are received."""
        return None

    def reply_scope(self, scope: str) -> Any:
        """Site side: where one reply's objects are written -- here, the store itself
        (replies are kept apart only in a filesystem store, :class:`ReplyScope`).
        """
        return self

    def for_reply(self, scope: str | None, pack: Any = None) -> Any:
        """Replies are not kept apart here: the store itself (see :class:`ReplyScope`)."""
        return self

    def close_reply(self) -> dict[str, list[int]] | None:
        """Site side, after a reply's objects are put: nothing to close here (a packed
        :class:`ReplyScope` returns its index).
        """
        return None


class FilesystemStore(StoreDefaults):
    """Objects as files under ``<root>/objects/<id[:2]>/<id>``."""

    def __init__(self, root: str | Path, site: str = "", *, fsync: bool = False,
                 scoped_replies: bool = True, reply_packs: bool = True) -> None:
        self.root = Path(root)
        self.site = site or self.root.name
        self.fsync = bool(fsync)
        # replies written apart (ReplyScope) -- the server's choice, passed to the site in
        # the spec, so a server and a site worker of different versions still agree
        self.scoped_replies = bool(scoped_replies)
        # ... and each reply's objects in one file (a pack) rather than a file each
        self.reply_packs = bool(reply_packs)
        self.objects_dir = self.root / "objects"
        self.objects_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self.bytes_written = 0
        self.objects_written = 0

    def __repr__(self) -> str:
        """The store's site and root directory."""
        return f"FilesystemStore(site={self.site!r}, root={str(self.root)!r})"

    def spec(self) -> dict[str, Any]:
        """``{"type": "filesystem", "path", "site", "fsync", "scoped_replies",
        "reply_packs"}``, for :func:`open_store`.
        """
        return {"type": "filesystem", "path": str(self.root), "site": self.site,
                "fsync": self.fsync, "scoped_replies": self.scoped_replies,
                "reply_packs": self.reply_packs}

    def _path(self, object_id: str) -> Path:
        oid = check_object_id(object_id)
        return self.objects_dir / oid[:2] / oid

    def has(self, object_id: str) -> bool:
        """Whether the object's file exists (its bytes are not read). An object found is
        about to be used: its mtime is refreshed, which is what ``flwr-hpc gc`` reads.
        """
        return _touch(self._path(object_id))

    def put(self, object_id: str, data: ObjectData, *, trusted: bool = False) -> int:
        """Write ``data`` to the object's file atomically (temp file, rename), verified
        first unless ``trusted``; return bytes written, 0 if the file already exists.
        """
        path = self._path(object_id)
        if _touch(path):  # already here (the same bytes): now used again
            return 0
        return self._write(path, object_id, data, trusted)

    def _write(self, path: Path, object_id: str, data: ObjectData, trusted: bool) -> int:
        if not trusted:
            verify_object(object_id, data, f"data staged for {self}")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".tmp-{object_id[:16]}-{uuid.uuid4().hex}"
        try:
            with open(tmp, "wb", buffering=0) as fh:  # parts go straight to the kernel
                write_data(fh, data)
                if self.fsync:
                    os.fsync(fh.fileno())
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()
        nbytes = data_len(data)
        with self._lock:
            self.bytes_written += nbytes
            self.objects_written += 1
        return nbytes

    def reply_scope(self, scope: str) -> Any:
        """Site side: where one reply's objects are written (see :class:`ReplyScope`); the
        store itself unless the server asked for scoped replies (an older server reads
        every reply from ``objects/``).
        """
        from flwr_hpc.payload.reply_files import ReplyScope

        if not self.scoped_replies:
            return self
        return ReplyScope(self, scope, packing=self.reply_packs)

    def for_reply(self, scope: str | None, pack: Any = None) -> Any:
        """Server side: the :class:`ReplyScope` a result names (``reply_scope``), else
        the store itself (a reply written by an older worker, all in ``objects/``).
        """
        from flwr_hpc.payload.reply_files import ReplyScope

        return self if scope is None else ReplyScope(self, scope, index=pack)

    def reply_size(self, object_id: str) -> int | None:
        """The object file's size, or None if there is no such file."""
        try:
            return self._path(object_id).stat().st_size
        except FileNotFoundError:
            return None

    def get(self, object_id: str) -> bytes:
        """The object's verified bytes; raises :class:`PayloadMissingError` if there is
        no such file, and quarantines the file and raises
        :class:`PayloadIntegrityError` if its bytes do not hash to ``object_id``.
        """
        return self._read(self._path(object_id), object_id)

    def _read(self, path: Path, object_id: str) -> bytes:
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise PayloadMissingError(object_id, str(self)) from None
        try:
            return verify_object(object_id, data, str(self))
        except PayloadIntegrityError:
            self._quarantine(path)
            raise

    def _quarantine(self, path: Path) -> None:
        dest = self.root / "quarantine"
        dest.mkdir(exist_ok=True)
        try:
            os.replace(path, dest / f"{path.name}.{uuid.uuid4().hex[:8]}")
        except FileNotFoundError:
            pass


def _touch(path: Path) -> bool:
    """Refresh ``path``'s mtime; False if there is no such file."""
    try:
        os.utime(path)
    except FileNotFoundError:
        return False
    except OSError:  # not ours to touch (a read-only or shared store): still there
        pass
    return path.is_file()


# reply objects a site returns inside one task's result (base64: x4/3, under the 10 MiB
# result limit with room to spare)
INLINE_RESULT_BYTES = 2 * 1024 * 1024


class TransferSiteStore(FilesystemStore):
    """A Transfer store as the site sees it: plain files the server moves by Transfer,
    and the reply's small objects (up to ``inline_max_bytes`` each, at most
    :data:`INLINE_RESULT_BYTES` a task) also returned inside the task's result, so the
    server reads them without a transfer.
    """

    def __init__(self, root: str | Path, site: str = "", *, fsync: bool = False,
                 inline_max_bytes: int = 0) -> None:
        super().__init__(root, site, fsync=fsync)
        self.inline_max_bytes = int(inline_max_bytes)

    def reply_scope(self, scope: str) -> Any:
        """The store itself: the server fetches a reply's objects from ``objects/`` by
        Transfer (their paths are the store's), so they are not kept apart here.
        """
        return self

    def finish(self, result: dict[str, Any], job: dict[str, Any]) -> str | None:
        """Add the reply's small objects to ``result["objects"]`` (base64)."""
        if self.inline_max_bytes <= 0:
            return None
        small: dict[str, str] = {}
        total = 0
        for oid in result.get("object_ids") or []:
            size = self.reply_size(oid)
            if size is None or size > self.inline_max_bytes or total + size > INLINE_RESULT_BYTES:
                continue
            small[oid] = base64.b64encode(self.get(oid)).decode("ascii")  # verified read
            total += size
        if small:
            result["objects"] = small
        return None


def open_store(spec: dict[str, Any]) -> PayloadStore:
    """Reopen a store from its :meth:`PayloadStore.spec`."""
    kind = spec.get("type")
    if kind in ("filesystem", "shared-fs"):
        return FilesystemStore(spec["path"], site=spec.get("site", ""),
                               fsync=bool(spec.get("fsync", False)),
                               scoped_replies=bool(spec.get("scoped_replies", False)),
                               reply_packs=bool(spec.get("reply_packs", False)))
    if kind == "globus-transfer":  # plain files at the site; the server moves them
        return TransferSiteStore(spec["path"], site=spec.get("site", ""),
                                 fsync=bool(spec.get("fsync", False)),
                                 inline_max_bytes=int(spec.get("inline_max_bytes", 0)))
    raise ValueError(f"unknown payload store type {kind!r} in {spec!r}")
