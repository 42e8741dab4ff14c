"""Site-worker wrappers that inject faults (module-level so they ship by reference)."""

from __future__ import annotations

from flwr_hpc.payload.store import open_store
from flwr_hpc.worker import run_task


def _corrupt(store, oid: str) -> None:
    path = store.objects_dir / oid[:2] / oid
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def corrupt_reply(job: dict) -> dict:
    """Run normally, then flip a byte of the reply's root object at the site."""
    result = run_task(job)
    if result.get("ok"):
        _corrupt(open_store(job["store"]), result["reply_id"])
    return result


def corrupt_input(job: dict) -> dict:
    """Flip a byte of the staged message before the worker reads it."""
    _corrupt(open_store(job["store"]), job["message_id"])
    return run_task(job)
