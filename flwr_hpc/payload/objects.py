"""Flower messages as sha256 content-addressed objects (Flower's own object tree).

A ``Message`` deflates into a tree: Message -> RecordDict -> records -> Array -> ArrayChunk.
Every node's id is the sha256 of its bytes, and every node lists its children's ids in its
head, so a reader needs only the root id to fetch and verify the whole tree. The same
global model sent to many nodes is the same set of objects, which is what lets a site
receive it once per round however many clients it hosts.

The bytes and ids are exactly Flower's (tested against Flower's own ``deflate`` and
``object_id``), but the array data is never copied on the way out and copied once on the
way in:

- :func:`message_parts` returns each object as a tuple of buffers: an ``ArrayChunk`` is its
  small head plus a view into the ``Array``'s bytes, hashed in place (Flower's ``deflate``
  builds each chunk through a bytearray and a ``bytes`` copy, and computes every id again
  whenever ``object_id`` is asked). :func:`fast_object_ids` is the same trick for code that
  walks Flower's tree itself: inside it every id is computed once.
- :func:`inflate_message` joins an Array's verified chunk bodies straight into its data
  (Flower slices each body, appends it to a bytearray and copies that again), and with an
  :class:`ArrayCache` it does not even read an Array it has assembled before.

Nothing here unpickles: object bodies are Flower protobufs and ``np.save`` bytes loaded
with ``allow_pickle=False``.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, TypeVar

from flwr.app import Array, ArrayRecord, Message
from flwr.app.message import array as _flwr_array
from flwr.app.message.arraychunk import ArrayChunk
from flwr.supercore.constant import HEAD_BODY_DIVIDER, HEAD_VALUE_DIVIDER
from flwr.supercore.inflatable import inflatable_object as _flwr_objects
from flwr.supercore.inflatable.inflatable_object import (
    get_all_nested_objects,
    get_object_body,
    get_object_head_values_from_object_content,
)
from flwr.supercore.inflatable.inflatable_utils import (
    inflate_object_from_contents,
    validate_object_content,
)

from flwr_hpc.errors import InvalidObjectIdError, PayloadIntegrityError

if TYPE_CHECKING:
    from flwr.supercore.inflatable.inflatable_object import InflatableObject

_OBJECT_ID = re.compile(r"[0-9a-f]{64}")

Buffer = bytes | bytearray | memoryview
# An object's bytes as one buffer or as a tuple of buffers to be written one after another
Parts = tuple[Buffer, ...]
ObjectData = Buffer | Parts
_Data = TypeVar("_Data", bound=ObjectData)


def sha256_hex(data: ObjectData) -> str:
    """Hex sha256 of an object given as one buffer or as parts (hashed in order)."""
    if isinstance(data, tuple):
        digest = hashlib.sha256()
        for part in data:
            digest.update(part)
        return digest.hexdigest()
    return hashlib.sha256(data).hexdigest()


def as_parts(data: ObjectData) -> Parts:
    """The object's bytes as a tuple of buffers (one buffer: a 1-tuple)."""
    return data if isinstance(data, tuple) else (data,)


def write_data(fh: Any, data: ObjectData) -> None:
    """Write the object's bytes, part by part and without joining them, to the unbuffered
    binary file ``fh`` (``open(..., "wb", buffering=0)``: a write may take only part).
    """
    for part in as_parts(data):
        view = memoryview(part).cast("B")
        while view:
            view = view[fh.write(view):]


def data_len(data: ObjectData) -> int:
    """Byte length of an object given as one buffer or as parts."""
    if isinstance(data, tuple):
        return sum(memoryview(p).nbytes for p in data)
    return memoryview(data).nbytes


def join_parts(data: ObjectData) -> bytes:
    """The object's bytes as one ``bytes`` (one copy for parts; none for ``bytes``)."""
    if isinstance(data, bytes):
        return data
    if isinstance(data, tuple):
        return b"".join(data)
    return bytes(data)


def is_object_id(value: object) -> bool:
    """Whether ``value`` is a string of 64 lowercase hex digits (a sha256 object id)."""
    return isinstance(value, str) and _OBJECT_ID.fullmatch(value) is not None


def check_object_id(value: object) -> str:
    """Return ``value`` if it is a hex sha256, else raise (never builds a path from it)."""
    if not is_object_id(value):
        raise InvalidObjectIdError(value)
    return value  # type: ignore[return-value]


def array_bytes(message: Message) -> int:
    """Bytes of the arrays a message carries (0 for an error message)."""
    return sum(len(arr.data) for arr in _arrays(message))


# ----------------------------------------------------------------------------- deflate


def _chunk_head(nbytes: int) -> bytes:
    """The head Flower gives an ArrayChunk of ``nbytes`` (no children)."""
    return (f"ArrayChunk{HEAD_VALUE_DIVIDER}{HEAD_VALUE_DIVIDER}{nbytes}".encode()
            + HEAD_BODY_DIVIDER)


def _array_chunks(arr: Array) -> list[tuple[str, ArrayChunk]]:
    """``arr``'s chunks with their ids, as Flower's ``Array.slice_array`` caches them, but
    hashed in place: head, then a view of the data (Flower deflates each chunk to a copy).
    """
    chunks = arr.__dict__.get("_chunks")  # Flower clears it whenever ``data`` is set
    if chunks is not None:
        return chunks
    view = memoryview(arr.data).cast("B")
    step = _flwr_array.FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE
    chunks = []
    for start in range(0, len(view), step):
        body = view[start:start + step]
        digest = hashlib.sha256(_chunk_head(len(body)))
        digest.update(body)
        chunk = ArrayChunk(body)
        oid = chunk.__dict__["_object_id"] = digest.hexdigest()
        chunks.append((oid, chunk))
    arr.__dict__["_chunks"] = chunks
    return chunks


def _arrays(message: Message) -> Iterator[Array]:
    if message.has_content():
        for record in message.content.array_records.values():
            yield from record.values()


@contextmanager
def fast_object_ids(*messages: Message) -> Iterator[None]:
    """Inside this block Flower computes each object id of ``messages`` at most once, and
    their array chunks are hashed in place. The messages must not change inside it (their
    ids would go stale); Flower's own ``no_object_id_recompute`` is what makes ids stick.
    The block is per thread.
    """
    with _flwr_objects.no_object_id_recompute():
        computed = _flwr_objects._get_computed_object_ids()  # noqa: SLF001 - flwr 1.41
        for message in messages:
            for arr in _arrays(message):
                for oid, chunk in _array_chunks(arr):
                    chunk.__dict__["_object_id"] = oid
                    computed.add(oid)
        yield


def object_parts(obj: InflatableObject) -> Parts:
    """One object's bytes (Flower's ``deflate``) as parts; an ArrayChunk is not copied."""
    if type(obj) is ArrayChunk:
        body = memoryview(obj.data).cast("B")
        return (_chunk_head(len(body)), body)
    return (obj.deflate(),)


def message_parts(message: Message) -> dict[str, Parts]:
    """Deflate ``message`` into ``{object_id: parts}``, children first, nothing copied."""
    with fast_object_ids(message):
        return {oid: object_parts(obj)
                for oid, obj in get_all_nested_objects(message).items()}


def message_objects(message: Message) -> dict[str, bytes]:
    """Deflate ``message`` into ``{object_id: bytes}``, children included."""
    return {oid: join_parts(parts) for oid, parts in message_parts(message).items()}


def verify_object(object_id: str, content: _Data, where: str) -> _Data:
    """Return ``content`` if its sha256 is ``object_id``, else raise
    :class:`PayloadIntegrityError` naming ``where`` it was read.
    """
    actual = sha256_hex(content)
    if actual != object_id:
        raise PayloadIntegrityError(object_id, actual, where)
    return content


# ----------------------------------------------------------------------------- inflate


class ArrayCache:
    """Verified array data by ``Array`` object id, least recently used first out.

    An Array's id hashes its head, which lists its chunks' ids, which hash the data: a hit
    is the same bytes, so a worker assembles the global model once per phase, not once per
    task. Arrays under ``min_bytes`` (a few KiB: reading their one small object costs what
    a lookup does) are not kept; ``limit_bytes`` bounds the rest. (It was 1 MiB: a model
    of many sub-MiB tensors -- 4 MB in 8 -- was read and hashed again by every task.)
    """

    def __init__(self, limit_bytes: int, min_bytes: int = 16 << 10) -> None:
        self.limit_bytes, self.min_bytes = int(limit_bytes), int(min_bytes)
        self._data: OrderedDict[str, bytes] = OrderedDict()
        self.nbytes = 0
        self._lock = threading.Lock()

    def keys(self) -> list[str]:
        """The cached Array ids, least recently used first."""
        with self._lock:
            return list(self._data)

    def get(self, object_id: str) -> bytes | None:
        """The cached data of Array ``object_id`` (marked as just used), or None."""
        with self._lock:
            data = self._data.get(object_id)
            if data is not None:
                self._data.move_to_end(object_id)
            return data

    def put(self, object_id: str, data: bytes) -> None:
        """Keep ``data`` for Array ``object_id`` if its size is within
        ``[min_bytes, limit_bytes]``, dropping the least recently used arrays to stay
        within ``limit_bytes``.
        """
        if not self.min_bytes <= len(data) <= self.limit_bytes:
            return
        with self._lock:
            if object_id in self._data:
                return
            self._data[object_id] = data
            self.nbytes += len(data)
            while self.nbytes > self.limit_bytes:
                _, old = self._data.popitem(last=False)
                self.nbytes -= len(old)


def _array_head(object_id: str, content: bytes) -> tuple[dict, list[str]]:
    """An Array object's metadata and its chunk ids in data order (Flower's checks)."""
    obj_type, children, _ = get_object_head_values_from_object_content(content)
    if obj_type != "Array":
        raise ValueError(f"object {object_id[:16]}… is a {obj_type}, not an Array")
    body = memoryview(content)[content.index(HEAD_BODY_DIVIDER) + 1:]
    meta = json.loads(bytes(body).decode("utf-8"))
    try:
        chunk_ids = [children[i] for i in meta["arraychunk_ids"]]
    except (IndexError, TypeError, KeyError):
        raise ValueError(f"Array {object_id[:16]}…: chunk indices do not match its "
                         "children") from None
    if set(chunk_ids) != set(children):
        raise ValueError(f"Array {object_id[:16]}…: unexpected set of children")
    return meta, chunk_ids


def _new_array(meta: dict, data: bytes) -> Array:
    return Array(dtype=str(meta["dtype"]), shape=tuple(int(d) for d in meta["shape"]),
                 stype=str(meta["stype"]), data=data)


def _array_record(object_id: str, content: bytes,
                  arrays: dict[str, InflatableObject]) -> ArrayRecord:
    """An ArrayRecord holding these very Array objects (Flower's checks: its children are
    exactly the arrays its body names).
    """
    _, children, _ = get_object_head_values_from_object_content(content)
    refs = json.loads(get_object_body(content, ArrayRecord).decode("utf-8"))
    if not isinstance(refs, dict) or set(refs.values()) != set(children):
        raise ValueError(f"ArrayRecord {object_id[:16]}…: its arrays do not match its "
                         "children")
    record = ArrayRecord()
    for name, array_id in refs.items():
        record[name] = arrays[array_id]  # type: ignore[assignment]
    return record


def _join_chunks(chunk_ids: list[str], read: Callable[[str], bytes]) -> bytes:
    """An Array's data: its chunks read (``read`` verifies each one's sha256) and their
    bodies joined once; a chunk repeated in the list is read once.
    """
    chunks = {}
    for cid in dict.fromkeys(chunk_ids):
        chunks[cid] = read(check_object_id(cid))
        validate_object_content(chunks[cid])
    return b"".join([_chunk_body(cid, chunks[cid]) for cid in chunk_ids])


class StoredArray(Array):
    """An ``Array`` of a reply whose bytes (``stored_bytes`` in its chunk objects) stay in
    the payload store until first asked for: ``data`` then reads its chunks, verifying
    each one's sha256 (a chunk that no longer matches raises
    :class:`~flwr_hpc.errors.PayloadIntegrityError`), and keeps them until :meth:`release`.
    Everything else is Flower's ``Array``. A streaming strategy that takes one array at a
    time and releases it holds one array of the reply, not all of it
    (:class:`flwr_hpc.strategy.streaming.StreamingFedAvg`).
    """

    stored_bytes: int

    def __init__(self, meta: dict, chunk_ids: list[str], read: Callable[[str], bytes],
                 stored_bytes: int = 0) -> None:
        # Flower's __init__ wants the bytes; these are the same fields, data deferred
        self.__dict__.update(dtype=str(meta["dtype"]),
                             shape=tuple(int(d) for d in meta["shape"]),
                             stype=str(meta["stype"]), _chunk_ids=list(chunk_ids),
                             _read=read, stored_bytes=int(stored_bytes))

    @property
    def data(self) -> bytes:
        """The array's bytes (read and verified on first use, kept until released)."""
        data = self.__dict__.get("_data")
        if data is None:
            data = self.__dict__["_data"] = _join_chunks(self.__dict__["_chunk_ids"],
                                                         self.__dict__["_read"])
        return data

    @data.setter
    def data(self, value: bytes) -> None:  # new bytes: no longer the stored ones
        self.__dict__["_data"] = value
        self.__dict__["_chunk_ids"] = None

    def deflate(self) -> bytes:
        """Flower's ``Array`` bytes (Flower names an object's type after its class)."""
        return Array(dtype=self.dtype, shape=tuple(self.shape), stype=self.stype,
                     data=self.data).deflate()

    @property
    def loaded(self) -> bool:
        """Whether the bytes are in memory now."""
        return self.__dict__.get("_data") is not None

    def release(self) -> None:
        """Let the bytes go (they are read again if asked for); bytes set by the caller
        are kept.
        """
        if self.__dict__.get("_chunk_ids") is not None:
            self.__dict__.pop("_data", None)


def _chunk_body(object_id: str, content: bytes) -> memoryview:
    obj_type, children, body_len = get_object_head_values_from_object_content(content)
    if obj_type != "ArrayChunk" or children:
        raise ValueError(f"object {object_id[:16]}… is a {obj_type}, not an ArrayChunk")
    return memoryview(content)[len(content) - body_len:]


def stored_bytes(message: Message) -> int:
    """The bytes of ``message``'s arrays that are still in the store (:class:`StoredArray`
    not read yet).
    """
    if message.has_error():
        return 0
    return sum(a.stored_bytes for record in message.content.array_records.values()
               for a in record.values() if isinstance(a, StoredArray) and not a.loaded)


def collect_tree(root_id: str, read: Callable[[str], bytes],
                 skip: Callable[[str, str], bool] | None = None) -> dict[str, bytes]:
    """Read the object tree below ``root_id``; ``read`` must verify each object's sha256.
    ``skip(object_id, object_type)``: read that object but not its children.
    """
    contents: dict[str, bytes] = {}
    pending = [check_object_id(root_id)]
    while pending:
        oid = pending.pop()
        if oid in contents:
            continue
        data = read(oid)
        validate_object_content(data)
        contents[oid] = data
        obj_type, children, _ = get_object_head_values_from_object_content(data)
        if skip is not None and skip(oid, obj_type):
            continue
        pending.extend(check_object_id(c) for c in children)
    return contents


def inflate_message(root_id: str, read: Callable[[str], bytes], *,
                    cache: ArrayCache | None = None,
                    stored: Callable[[str], int | None] | None = None) -> Message:
    """Rebuild a ``Message`` from its verified objects and restore its message id.

    Arrays are assembled here, one at a time: an array's chunks are read, their bodies
    joined once into the array's data, and let go before the next array's (so a reply
    costs its arrays plus one array's chunks in memory, not twice its size). With a
    ``cache``, an array assembled before is taken from it and its chunks are not read.
    With ``stored`` (a store's ``reply_size``: an object's size if it can be read later,
    else None), an array whose chunks are all there is not read here but becomes a
    :class:`StoredArray`, read (and verified) on first use.
    """
    contents = collect_tree(root_id, read, skip=lambda _oid, kind: kind == "Array")
    arrays: dict[str, InflatableObject] = {}
    for oid, content in contents.items():
        if not content.startswith(b"Array "):
            continue
        meta, chunk_ids = _array_head(oid, content)
        sizes = ([stored(check_object_id(c)) for c in dict.fromkeys(chunk_ids)]
                 if stored is not None else [None])
        if None not in sizes:
            arrays[oid] = StoredArray(meta, chunk_ids, read, sum(sizes))  # type: ignore[arg-type]
            continue
        data = cache.get(oid) if cache is not None else None
        if data is None:
            data = _join_chunks(chunk_ids, read)
            if cache is not None:
                cache.put(oid, data)
        arrays[oid] = _new_array(meta, data)
    objects: dict[str, InflatableObject] = dict(arrays)
    if stored is not None:  # Flower's ArrayRecord.inflate would copy each Array (reading it)
        for oid, content in contents.items():
            if content.startswith(b"ArrayRecord "):
                objects[oid] = _array_record(oid, content, arrays)
    message = inflate_object_from_contents(root_id, contents, keep_object_contents=False,
                                           objects=objects)
    if not isinstance(message, Message):
        raise TypeError(f"object {root_id[:16]}… is a {type(message).__name__}, not a Message")
    # ``Message.deflate`` omits the id; Flower's grids use the object id as message id.
    message.metadata.__dict__["_message_id"] = root_id
    return message
