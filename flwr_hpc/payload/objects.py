"""Flower messages as sha256 content-addressed objects (Flower's own object tree).

A ``Message`` deflates into a tree: Message -> RecordDict -> records -> Array -> ArrayChunk.
Every node's id is the sha256 of its bytes, and every node lists its children's ids in its
head, so a reader needs only the root id to fetch and verify the whole tree. The same
global model sent to many nodes is the same set of objects, which is what lets a site
receive it once per round however many clients it hosts.

Nothing here unpickles: object bodies are Flower protobufs and ``np.save`` bytes loaded
with ``allow_pickle=False``.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable

from flwr.app import Message
from flwr.supercore.inflatable.inflatable_object import (
    get_all_nested_objects,
    get_object_children_ids_from_object_content,
)
from flwr.supercore.inflatable.inflatable_utils import (
    inflate_object_from_contents,
    validate_object_content,
)

from flwr_hpc.errors import InvalidObjectIdError, PayloadIntegrityError

_OBJECT_ID = re.compile(r"[0-9a-f]{64}")


def sha256_hex(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def is_object_id(value: object) -> bool:
    return isinstance(value, str) and _OBJECT_ID.fullmatch(value) is not None


def check_object_id(value: object) -> str:
    """Return ``value`` if it is a hex sha256, else raise (never builds a path from it)."""
    if not is_object_id(value):
        raise InvalidObjectIdError(value)
    return value  # type: ignore[return-value]


def array_bytes(message: Message) -> int:
    """Bytes of the arrays a message carries (0 for an error message)."""
    if message.has_error():
        return 0
    return sum(len(arr.data) for rec in message.content.array_records.values()
               for arr in rec.values())


def message_objects(message: Message) -> dict[str, bytes]:
    """Deflate ``message`` into ``{object_id: bytes}``, children included."""
    return {oid: obj.deflate() for oid, obj in get_all_nested_objects(message).items()}


def verify_object(object_id: str, content: bytes, where: str) -> bytes:
    actual = sha256_hex(content)
    if actual != object_id:
        raise PayloadIntegrityError(object_id, actual, where)
    return content


def collect_tree(root_id: str, read: Callable[[str], bytes]) -> dict[str, bytes]:
    """Read the object tree below ``root_id``; ``read`` must verify each object's sha256."""
    contents: dict[str, bytes] = {}
    pending = [check_object_id(root_id)]
    while pending:
        oid = pending.pop()
        if oid in contents:
            continue
        data = read(oid)
        validate_object_content(data)
        contents[oid] = data
        children = get_object_children_ids_from_object_content(data)
        pending.extend(check_object_id(c) for c in children)
    return contents


def inflate_message(root_id: str, read: Callable[[str], bytes]) -> Message:
    """Rebuild a ``Message`` from its verified objects and restore its message id."""
    contents = collect_tree(root_id, read)
    message = inflate_object_from_contents(root_id, contents, keep_object_contents=False)
    if not isinstance(message, Message):
        raise TypeError(f"object {root_id[:16]}… is a {type(message).__name__}, not a Message")
    # ``Message.deflate`` omits the id; Flower's grids use the object id as message id.
    message.metadata.__dict__["_message_id"] = root_id
    return message
