"""Running one site task in this process: fetch and verify the message and the node's
``Context``, load the ClientApp from the run's FAB (checked against the site's allow-list,
installed once per site), run it, write the reply and the new ``Context``.

Site side: imports only :mod:`flwr_hpc.protocol`, :mod:`flwr_hpc.payload`,
:mod:`flwr_hpc.fab`, :mod:`flwr_hpc.errors` and :mod:`flwr_hpc._proc`.
"""

from __future__ import annotations

import base64
import os
import random
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from flwr.app import Context, Error, Message
from flwr.common.constant import ErrorCode

from flwr_hpc.errors import FlwrHpcError
from flwr_hpc.fab import check_fab, install_fab
from flwr_hpc.payload.inline import InlineSiteStore
from flwr_hpc.payload.objects import (
    ArrayCache,
    check_object_id,
    inflate_message,
    message_parts,
    sha256_hex,
)
from flwr_hpc.payload.store import FilesystemStore, open_store
from flwr_hpc.protocol import (
    ENV_ALLOW_BY_NAME,
    ENV_ALLOWED_FABS,
    INLINE_CONTEXT_BYTES,
    context_from_bytes,
    context_to_bytes,
)

if TYPE_CHECKING:
    from flwr.clientapp import ClientApp

_APP_CACHE: dict[str, Any] = {}

# Arrays this worker process has assembled from verified chunks, by Array object id
# (content-addressed, so a hit is the same bytes): the global model is read, hashed and
# assembled once per worker and phase, not once per task.
_CACHE_LIMIT = int(os.environ.get("FLWR_HPC_WORKER_CACHE_MB", "1024")) << 20
ARRAYS = ArrayCache(_CACHE_LIMIT)


def fab_refusal(fab_hash: str, fab_id: str, site: str,
                environ: dict[str, str] | None = None) -> str:
    """Why this site refuses the FAB ('' when it may run)."""
    env = os.environ if environ is None else environ
    allowed = [e for e in env.get(ENV_ALLOWED_FABS, "").replace(",", " ").split() if e]
    if not allowed:
        return ""
    if fab_hash in allowed:
        return ""
    # A FAB names its publisher and name itself: anyone can build a FAB claiming
    # "myorg/app". Such entries admit FABs only where the admin says names are enough.
    publisher = fab_id.split("/", 1)[0]
    by_name = [e for e in allowed if e in (fab_id, f"{publisher}/*", publisher)]
    if by_name and env.get(ENV_ALLOW_BY_NAME, "") in ("1", "true", "yes"):
        return ""
    note = (f"; the entry {by_name[0]!r} matches only the name the FAB gives itself, which "
            f"any FAB can claim, so it admits nothing unless {ENV_ALLOW_BY_NAME}=1 is set"
            if by_name else "")
    return (f"site '{site}' does not run FAB {fab_hash} ({fab_id}): its sha256 is not in "
            f"the site's {ENV_ALLOWED_FABS} allow-list ({', '.join(allowed)}){note}; ask "
            "the site's admin to add the FAB's sha256")


def load_client_app(fab_hash: str, fab_bytes_fn: Callable[[], bytes], apps_dir: Path,
                    site: str = "") -> ClientApp:
    """ClientApp of the FAB ``fab_hash``; installed and imported once per worker process.
    The site's allow-list is checked on every task, before anything is installed or run.
    """
    cached = _APP_CACHE.get(fab_hash)
    if cached is None:
        fab_bytes = fab_bytes_fn()
        info = check_fab(fab_bytes)  # bounded, and names checked, before anything else
        cached = (None, info.fab_id, info.version, fab_bytes)
    app, fab_id, version, fab_bytes = cached
    refusal = fab_refusal(fab_hash, fab_id, site)
    if refusal:
        raise FabRefusedError(refusal)
    if app is None:
        from flwr.clientapp.utils import get_load_client_app_fn

        app_dir = install_fab(fab_bytes, fab_hash, apps_dir)
        app = get_load_client_app_fn("", str(app_dir), multi_app=True)(fab_id, version,
                                                                       fab_hash)
        _APP_CACHE[fab_hash] = (app, fab_id, version, None)
    return app


class FabRefusedError(FlwrHpcError):
    """The site's allow-list does not include this FAB."""


def task_store(job: dict[str, Any]) -> InlineSiteStore | FilesystemStore:
    """The store a task reads from and writes to: the site's (with the small objects the
    task carries written into it first), or (inline) the task itself.
    """
    if job["store"].get("type") == "inline":
        return InlineSiteStore(job.get("objects") or {}, site=job["store"].get("site", ""))
    # at the site every other kind of store is plain files (see open_store)
    store = cast(FilesystemStore, open_store(job["store"]))
    if job.get("objects"):  # small objects that rode inside the task (a Transfer store's)
        from flwr_hpc.payload.inline import decode

        for oid, data in decode(job["objects"]).items():
            store.put(oid, data)  # verified: an object whose bytes do not match is refused
    return store


def failure_result(job: dict, code: int, reason: str, started_at: float) -> dict[str, Any]:
    """A task result with ``ok`` False: the Flower ``ErrorCode`` ``code`` and ``reason``
    (its last 4000 characters) for the job's message.
    """
    return {
        "ok": False,
        "message_id": job.get("message_id"),
        "error_code": int(code),
        "reason": reason[-4000:],
        "started_at": started_at,
        "finished_at": time.time(),
        "pid": os.getpid(),
    }


def limit_threads(threads: int | None) -> None:
    """Several workers share this machine: keep each to its share of the cores."""
    if not threads:
        return
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(int(threads))
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(int(threads))


def execute(job: dict[str, Any], started_at: float, *, primary: bool) -> dict[str, Any]:
    """Fetch, run the ClientApp, and (``primary`` only) write the reply and context.

    In a launched rank group every rank calls this on the same job; only rank 0 is
    ``primary``, so exactly one reply reaches the store.
    """
    try:
        store = task_store(job)
        message_id = check_object_id(job["message_id"])
        context_id = check_object_id(job["context_id"])
        fab_hash = check_object_id(job["fab_hash"])
        message = inflate_message(message_id, store.get,
                                  cache=None if store.carries_objects else ARRAYS)
        context = context_from_bytes(store.get(context_id))
    except FlwrHpcError as err:
        return failure_result(job, ErrorCode.MESSAGE_UNAVAILABLE, str(err), started_at)
    fetched_at = time.time()

    try:
        from flwr.supercore.task_identity import TaskIdentity

        TaskIdentity.run_id = int(job["run_id"])
        TaskIdentity.node_id = int(job["node_id"])
        TaskIdentity.task_id = random.getrandbits(63)
        app = load_client_app(fab_hash, lambda: store.get(fab_hash), Path(job["apps_dir"]),
                              site=str(job.get("site", "")))
    except FabRefusedError as err:
        return failure_result(job, ErrorCode.LOAD_CLIENT_APP_EXCEPTION, str(err), started_at)
    except Exception as err:  # noqa: BLE001
        return failure_result(
            job, ErrorCode.LOAD_CLIENT_APP_EXCEPTION,
            f"could not load the ClientApp: {type(err).__name__}: {err}", started_at,
        )
    loaded_at = time.time()

    context_out: Context | None
    try:
        reply = app(message, context)
        context_out = context
    except Exception as err:  # noqa: BLE001 - a ClientApp error is the node's reply
        reason = (
            f"ClientApp raised {type(err).__name__}: {err}\n"
            + "".join(traceback.format_exception(err)[-6:])
        )
        reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason),
                        reply_to=message)
        context_out = None
    app_done_at = time.time()

    parts = message_parts(reply)  # {id: bytes}, children first: the reply's id is last
    result: dict[str, Any] = {
        "ok": True,
        "message_id": message_id,
        "reply_id": next(reversed(parts)),
        "reply_bytes": 0,
        "context_id": None,
        "started_at": started_at,
        "fetch_s": fetched_at - started_at,
        "load_s": loaded_at - fetched_at,
        "app_s": app_done_at - loaded_at,
        "pid": os.getpid(),
    }
    if not primary:
        result["finished_at"] = time.time()
        return result
    written = []
    # a filesystem store keeps the reply's objects apart, so the server can remove them
    # once used (payload.reply_files.ReplyScope); elsewhere the store itself
    writer = store.reply_scope(message_id)
    if writer is not store:
        result["reply_scope"] = message_id
    for oid, data in parts.items():  # ids just computed from the bytes
        result["reply_bytes"] += writer.put(oid, data, trusted=True)
        written.append(oid)
    pack = writer.close_reply()  # a packed reply: one file, its index in the result
    if pack is not None:
        result["reply_pack"] = pack
    if context_out is not None:
        ctx_bytes = context_to_bytes(context_out)
        ctx_id = sha256_hex(ctx_bytes)
        store.put(ctx_id, ctx_bytes, trusted=True)
        result["context_id"] = ctx_id
        written.append(ctx_id)
        if len(ctx_bytes) <= INLINE_CONTEXT_BYTES and not store.carries_objects:
            # the server keeps the node's Context when the task ends, without a fetch
            result["context"] = base64.b64encode(ctx_bytes).decode("ascii")
    # every object the server must read, so a Transfer store fetches them in one task
    result["object_ids"] = written
    problem = store.finish(result, job)  # inline: the reply travels in the result
    if problem:
        return failure_result(job, ErrorCode.REPLY_MESSAGE_UNAVAILABLE, problem, started_at)
    result["finished_at"] = time.time()
    return result
