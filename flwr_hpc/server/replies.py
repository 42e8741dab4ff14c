"""From a site worker's result to what the ServerApp sees.

:func:`collect` turns a finished :class:`~flwr_hpc.server.tasks.Task` into the reply
``Message`` (never raising: every failure becomes a Flower ``Error`` reply with the code
that says what happened), after reading and verifying the reply's objects from the site's
store. :func:`returned_context` reads the node ``Context`` a ClientApp left behind.
Each outcome is handed to ``record(task, outcome, **fields)``, which writes the task's
``tasks.jsonl`` row.
"""

from __future__ import annotations

import base64
import logging
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flwr.app import Context, Error, Message
from flwr.common.constant import ErrorCode

from flwr_hpc.errors import (
    FlwrHpcError,
    InvalidObjectIdError,
    RemoteTaskError,
    WorkerLostError,
)
from flwr_hpc.payload.objects import inflate_message, sha256_hex, stored_bytes
from flwr_hpc.payload.reply_files import ReplyScope, drop_reply_files
from flwr_hpc.payload.store import PayloadStore
from flwr_hpc.protocol import context_from_bytes
from flwr_hpc.server.tasks import Task, error_outcome

log = logging.getLogger("flwr_hpc")

Record = Callable[..., None]


def error_reply(task: Task, code: int, reason: str) -> Message:
    """A Flower ``Error`` reply to ``task``'s message, with its message id set."""
    reply = Message(Error(code=code, reason=reason), reply_to=task.message)
    reply.metadata.__dict__["_message_id"] = reply.object_id
    return reply


def collect(task: Task, store: PayloadStore | None, label: str, record: Record, *,
            lazy: bool = False) -> Message:
    """Turn a finished task into the reply the strategy sees (never raises). ``store``:
    the site's store (``None`` only for a task that never reached a site). ``lazy``: the
    reply's arrays stay in the store until the strategy reads them
    (:class:`~flwr_hpc.payload.objects.StoredArray`) where the store can promise that.
    """
    if task.immediate is not None:
        reply = task.immediate
        reply.metadata.__dict__["_message_id"] = reply.object_id
        record(task, error_outcome(reply.error.code), error=reply.error.reason)
        return reply
    assert task.future is not None
    try:
        result = task.future.result()
    except WorkerLostError as err:
        record(task, "error:CLIENT_APP_CRASHED", error=str(err))
        return error_reply(task, ErrorCode.CLIENT_APP_CRASHED, str(err))
    except RemoteTaskError as err:
        record(task, "error:UNKNOWN", error=err.remote_traceback[-2000:])
        return error_reply(task, ErrorCode.UNKNOWN, str(err))
    except Exception as err:  # noqa: BLE001
        record(task, "error:UNKNOWN", error=repr(err))
        return error_reply(task, ErrorCode.UNKNOWN, repr(err))
    if not isinstance(result, dict) or result.get("message_id") != task.message_id:
        record(task, "error:UNKNOWN", error="mismatched task result")
        return error_reply(task, ErrorCode.UNKNOWN,
                           "site returned a result for a different message")
    if not result.get("ok"):
        code = int(result.get("error_code", ErrorCode.UNKNOWN))
        record(task, error_outcome(code), result=result, error=result.get("reason"))
        return error_reply(task, code, str(result.get("reason")))

    assert store is not None
    t0 = time.monotonic()
    own: list[Path] = []
    try:
        if task.fetch_error:
            raise FlwrHpcError(task.fetch_error)
        scope = result.get("reply_scope")
        if scope is not None and scope != task.message_id:
            raise FlwrHpcError(f"the result names reply scope {str(scope)[:16]}…, not its "
                               f"message {task.message_id[:16]}…")
        reader = _ReplyReader(store.for_reply(scope, result.get("reply_pack")))
        # what to remove once the reply is used: its own files (ids validated here)
        own = (reader.source.paths(list(result.get("object_ids") or []))
               if isinstance(reader.source, ReplyScope) else [])
        # inline: the objects the result carries (or its file reply); Transfer: a no-op
        # when the grid fetched the site's batch already
        store.receive(result, result.get("object_ids") or [result["reply_id"]], label)
        reply = inflate_message(result["reply_id"], reader,
                                stored=reader.source.reply_size if lazy else None)
        left = stored_bytes(reply)  # read when the strategy asks for them
        md = reply.metadata
        if md.reply_to_message_id != task.message_id or md.src_node_id != task.node.node_id:
            raise FlwrHpcError(
                f"reply {result['reply_id'][:16]}… answers message "
                f"{md.reply_to_message_id[:16]}… from node {md.src_node_id}, not "
                f"{task.message_id[:16]}… from node {task.node.node_id}"
            )
    except Exception as err:  # noqa: BLE001 - corrupted/mismatched replies are never used
        log.error("rejected reply of node %s (site %s): %s",
                  task.node.node_id, task.node.site, err)
        if own:
            drop_reply_files(own)
        record(task, "error:REPLY_MESSAGE_UNAVAILABLE", result=result, error=str(err))
        return error_reply(task, ErrorCode.REPLY_MESSAGE_UNAVAILABLE, str(err))
    read_bytes = reader.read_bytes + left
    if own and left == 0:  # read whole: its files are of no further use
        drop_reply_files(own)
    elif own:  # once the last of its stored arrays is let go
        weakref.finalize(reader, drop_reply_files, own)
    fetch_s = time.monotonic() - t0
    outcome, err_text = "ok", None
    if reply.has_error():
        outcome, err_text = error_outcome(reply.error.code), reply.error.reason
    record(task, outcome, result=result, bytes_from_site=read_bytes, fetch_s=fetch_s,
           error=err_text)
    return reply


class _ReplyReader:
    """Reads one reply's objects (counting the bytes); the reply's stored arrays keep it
    (their ``_read``), so it lives exactly as long as something can still read the reply.
    """

    __slots__ = ("source", "read_bytes", "__weakref__")

    def __init__(self, source: PayloadStore) -> None:
        self.source = source
        self.read_bytes = 0

    def __call__(self, object_id: str) -> bytes:
        data = self.source.get(object_id)
        self.read_bytes += len(data)
        return data


def discard(task: Task, store: PayloadStore | None) -> None:
    """Remove the reply objects of a result nobody will read (a late result discarded):
    a filesystem store's :class:`~flwr_hpc.payload.reply_files.ReplyScope`; nothing elsewhere.
    """
    result: Any = task.safe_result()
    scope = result.get("reply_scope") if isinstance(result, dict) else None
    if store is None or not scope or scope != task.message_id:  # only this message's files
        return
    try:
        source = store.for_reply(scope, result.get("reply_pack"))
        if isinstance(source, ReplyScope):
            source.drop(list(result.get("object_ids") or []))
    except InvalidObjectIdError:  # not a scope or id this store would ever have written
        pass


def returned_context(task: Task, store: PayloadStore, label: str) -> Context | None:
    """The node's ``Context`` as its ClientApp left it, or ``None`` when the task did not
    return one for this message (failed, late, or a result for another message) or it
    cannot be read (logged; the node keeps its previous Context).
    """
    result: Any = task.safe_result()
    if not isinstance(result, dict) or not result.get("ok") or not result.get(
            "context_id") or result.get("message_id") != task.message_id:
        return None
    context_id = str(result["context_id"])
    try:
        inline = result.get("context")
        if inline is not None:
            data = base64.b64decode(inline)
            if sha256_hex(data) != context_id:
                raise FlwrHpcError(f"the Context returned inline does not match its "
                                   f"sha256 {context_id[:16]}…")
        else:
            store.receive(result, [context_id], label)
            data = store.get(context_id)
        return context_from_bytes(data)
    except Exception as err:  # noqa: BLE001 - the node keeps its previous Context
        log.error("node %s (site %s): could not read the Context its ClientApp "
                  "returned (%s); the node keeps its previous Context",
                  task.node.node_id, task.node.site, err)
        return None
