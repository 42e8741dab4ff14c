"""A reply's own files in a filesystem store: written apart by the site worker, read
by the server, removed as soon as nothing can read the reply (:class:`ReplyScope`).

Split out of :mod:`flwr_hpc.payload.store` (which opens the stores and keeps the shared
objects); the site worker gets a :class:`ReplyScope` from
``FilesystemStore.reply_scope`` and the server from ``FilesystemStore.for_reply``.
"""

from __future__ import annotations

import atexit
import os
import queue
import threading
import uuid
from pathlib import Path
from typing import Any

from flwr_hpc.errors import FlwrHpcError, PayloadIntegrityError, PayloadMissingError
from flwr_hpc.payload.objects import (
    ObjectData,
    check_object_id,
    data_len,
    verify_object,
    write_data,
)

REPLIES_DIR = "replies"
# per-object layout (an older server): a reply's objects from this size on are kept
# apart and removed once used: the array
# chunks, i.e. nearly all of its bytes. Smaller ones (message heads, small arrays) stay in
# objects/ like every other object: removing them saves no page cache, and creating and
# removing a file per small object cost 10-20 % of a round of 4 MB replies.
SCOPED_MIN_BYTES = 1 << 20


class ReplyScope:
    """One reply's objects in a :class:`FilesystemStore`, kept apart so they can go as
    soon as the server has used them.

    The site worker writes the reply to the message ``scope`` (its Flower message id) --
    a name no other reply or message uses -- except objects the store holds already (an
    array the ClientApp returned unchanged: a chunk of the model it was sent), which stay
    shared in ``objects/``; its result names the scope. Two layouts, the server's choice
    (the store spec's ``reply_packs``, so a server and a site worker of different versions
    still agree):

    - **packed** (``packing``): every new object of the reply, appended to one file
      ``<root>/replies/<scope[:2]>/<scope>.pack`` (temp file, rename), and the result
      carries the pack's index ``{object id: [offset, length]}`` (``reply_pack``). One
      file per reply instead of one per object: creating a file costs 0.2-1 ms on this
      project's test machine's ext4 (and a metadata-server round trip on Lustre/GPFS),
      and a 4 MB reply of 8 tensors is about 25 objects -- that was most of a 4 MB
      task's fixed cost (``flwr-hpc bench transport``);
    - per object (an older server): objects of :data:`SCOPED_MIN_BYTES` or more as
      ``<root>/replies/<id[:2]>/<id>.<scope>``, smaller ones in ``objects/``.

    The server reads the reply from there (then from ``objects/``), every object verified
    against its id as always, and, once nothing can read the reply any more (every array
    of it folded into the aggregate and let go; at once for a reply read whole), removes
    its files (:meth:`drop`): nothing else refers to them, so that never takes an object
    from another reply. Every reply kept for the whole run instead filled the page cache
    with dirty pages the kernel then made every writer wait for (N=32, S=64 MB: 5.2-6.9 s
    per round before, 3.9-4.1 s after). ``flwr-hpc gc`` removes the files of replies never
    collected (a run killed mid-round, a late result discarded) with the store's other
    unused objects.
    """

    # store: the FilesystemStore (not imported: it imports this module)
    def __init__(self, store: Any, scope: str, *, packing: bool = False,
                 index: Any = None) -> None:
        self.store = store
        self.site = store.site
        self.scope = check_object_id(scope)  # hex only: never a path
        self.root = store.root / REPLIES_DIR
        self.packing = packing  # site side: this reply is written as a pack
        # server side: the pack's index as the result gave it (checked entry by entry)
        self.index: Any = index
        self._written: dict[str, list[int]] = {}
        self._fh: Any = None
        self._tmp: Path | None = None
        self._offset = 0

    def __repr__(self) -> str:
        """The store and the scope."""
        return f"ReplyScope({self.store!r}, {self.scope[:16]}…)"

    @property
    def pack_path(self) -> Path:
        """The reply's pack file (packed layout)."""
        return self.root / self.scope[:2] / f"{self.scope}.pack"

    def path(self, object_id: str) -> Path:
        """Where this reply's copy of ``object_id`` is (or would be) written (per-object
        layout).
        """
        oid = check_object_id(object_id)
        return self.root / oid[:2] / f"{oid}.{self.scope}"

    def put(self, object_id: str, data: ObjectData, *, trusted: bool = False) -> int:
        """Write one object of the reply, unless the store holds it already (then it is
        shared, and 0 is returned); bytes written otherwise. Per-object layout: objects
        under :data:`SCOPED_MIN_BYTES` go to ``objects/`` as any other.
        """
        if self.packing:
            return self._append(object_id, data, trusted)
        if data_len(data) < SCOPED_MIN_BYTES:  # small: in objects/, as every object
            return self.store.put(object_id, data, trusted=trusted)
        path = self.path(object_id)
        if self.store.has(object_id) or path.is_file():
            return 0
        return self.store._write(path, object_id, data, trusted)

    def _append(self, object_id: str, data: ObjectData, trusted: bool) -> int:
        oid = check_object_id(object_id)
        if oid in self._written or self.store.has(oid):
            return 0
        if not trusted:
            verify_object(oid, data, f"reply data for {self.store}")
        try:
            if self._fh is None:
                self.pack_path.parent.mkdir(parents=True, exist_ok=True)
                self._tmp = self.pack_path.parent / f".tmp-{self.scope[:16]}-{uuid.uuid4().hex}"
                self._fh = open(self._tmp, "wb", buffering=0)  # noqa: SIM115 - closed in close_reply
            start = self._offset
            write_data(self._fh, data)
        except BaseException:
            self._abort()
            raise
        nbytes = data_len(data)
        self._offset = start + nbytes
        self._written[oid] = [start, nbytes]
        return nbytes

    def _abort(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if self._tmp is not None:
            self._tmp.unlink(missing_ok=True)
            self._tmp = None

    def close_reply(self) -> dict[str, list[int]] | None:
        """Site side, after the last :meth:`put`: the pack made visible (renamed into
        place, flushed to disk first if the store fsyncs) and its index returned for the
        result; None when the reply is not packed. A pack with nothing new is no file.
        """
        if not self.packing:
            return None
        if self._fh is not None:
            try:
                if self.store.fsync:
                    os.fsync(self._fh.fileno())
                self._fh.close()
                self._fh = None
                assert self._tmp is not None
                os.replace(self._tmp, self.pack_path)
                self._tmp = None
            except BaseException:
                self._abort()
                raise
            with self.store._lock:
                self.store.bytes_written += self._offset
                self.store.objects_written += 1
        return dict(self._written)

    def _entry(self, object_id: str) -> tuple[int, int] | None:
        """The pack's ``(offset, length)`` of ``object_id`` per the result's index (None
        if the pack does not hold it); an index that is not one is refused.
        """
        if self.index is None:
            return None
        if not isinstance(self.index, dict):
            raise FlwrHpcError(f"{self}: the reply's pack index is not a mapping")
        entry = self.index.get(object_id)
        if entry is None:
            return None
        if (not isinstance(entry, list | tuple) or len(entry) != 2
                or not all(type(x) is int and x >= 0 for x in entry)):
            raise FlwrHpcError(f"{self}: bad pack index entry for {object_id[:16]}…: "
                               f"{str(entry)[:40]}")
        return int(entry[0]), int(entry[1])

    def get(self, object_id: str) -> bytes:
        """The object's verified bytes, from the reply's pack or files, else the store."""
        entry = self._entry(object_id)
        if entry is not None:
            offset, length = entry
            try:
                with open(self.pack_path, "rb", buffering=0) as fh:
                    data = os.pread(fh.fileno(), length, offset)
            except FileNotFoundError:
                raise PayloadMissingError(object_id, str(self)) from None
            if len(data) != length:
                raise PayloadMissingError(object_id, f"{self} (pack too short)")
            try:
                return verify_object(object_id, data, str(self))
            except PayloadIntegrityError:
                self.store._quarantine(self.pack_path)  # kept aside, never used
                raise
        if self.index is None:
            path = self.path(object_id)
            if path.is_file():
                return self.store._read(path, object_id)
        return self.store.get(object_id)

    def reply_size(self, object_id: str) -> int | None:
        """The object's size (in the pack or the reply's files, else in the store), or
        None if none has it.
        """
        entry = self._entry(object_id)
        if entry is not None:
            return entry[1]
        if self.index is None:
            try:
                return self.path(object_id).stat().st_size
            except FileNotFoundError:
                pass
        return self.store.reply_size(object_id)

    def paths(self, object_ids: list[str]) -> list[Path]:
        """The reply's own files: its pack, or its files of ``object_ids`` (ids
        validated: never another path).
        """
        if self.index is not None:
            return [self.pack_path]
        return [self.path(oid) for oid in object_ids]

    def drop(self, object_ids: list[str]) -> None:
        """Remove the reply's own files (the shared objects stay)."""
        drop_reply_files(self.paths(object_ids))


def drop_reply_files(paths: list[Path]) -> None:
    """Remove one reply's files (see :class:`ReplyScope`) on a thread of its own, off the
    aggregation's path; gone already is fine. What is queued when the process exits is
    removed then (and by ``flwr-hpc gc`` if the process is killed).
    """
    if _EXITING:  # the queue was drained already (finalizers run after it): now
        _unlink_all(paths)
        return
    with _DROP_LOCK:  # reentrant: a finalizer may run here, on this thread
        if not _DROP_THREAD:
            thread = threading.Thread(target=_drop_loop, name="flwr-hpc-reply-drop",
                                      daemon=True)
            _DROP_THREAD.append(thread)
            atexit.register(_drain_drops)
            thread.start()
    _DROPS.put(paths)


_DROPS: queue.SimpleQueue[list[Path] | threading.Event] = queue.SimpleQueue()
_DROP_LOCK = threading.RLock()
_DROP_THREAD: list[threading.Thread] = []
_EXITING = False


def _unlink_all(paths: list[Path]) -> None:
    for path in paths:
        try:
            path.unlink(missing_ok=True)
        except OSError:  # not ours to remove after all: flwr-hpc gc reports it
            pass


def _handle(item: list[Path] | threading.Event) -> None:
    if isinstance(item, threading.Event):  # settle_reply_drops: everything before is done
        item.set()
    else:
        _unlink_all(item)


def _drop_loop() -> None:
    while True:
        _handle(_DROPS.get())


def settle_reply_drops(timeout: float = 30.0) -> bool:
    """Wait until every removal queued so far is done (True), or ``timeout`` passes."""
    if not _DROP_THREAD or _EXITING:
        return True
    done = threading.Event()
    _DROPS.put(done)
    return done.wait(timeout)


def _drain_drops() -> None:
    global _EXITING
    _EXITING = True
    while True:
        try:
            _handle(_DROPS.get_nowait())
        except queue.Empty:
            return
