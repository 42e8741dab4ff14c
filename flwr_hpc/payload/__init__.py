"""Payload plane: content-addressed objects and the stores that move them to sites."""

from flwr_hpc.payload.objects import (
    check_object_id,
    inflate_message,
    is_object_id,
    message_objects,
    sha256_hex,
)
from flwr_hpc.payload.store import FilesystemStore, PayloadStore, open_store

__all__ = [
    "FilesystemStore",
    "PayloadStore",
    "check_object_id",
    "inflate_message",
    "is_object_id",
    "message_objects",
    "open_store",
    "sha256_hex",
]
