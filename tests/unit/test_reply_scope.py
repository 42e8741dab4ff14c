"""A reply's large objects are kept apart in a filesystem store and removed once used
(#22: every reply kept for the run filled the page cache with dirty pages)."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

from flwr_hpc.errors import InvalidObjectIdError, PayloadMissingError
from flwr_hpc.payload.objects import sha256_hex
from flwr_hpc.payload.store import (
    SCOPED_MIN_BYTES,
    FilesystemStore,
    ReplyScope,
    drop_reply_files,
    settle_reply_drops,
)

SCOPE = "ab" * 32


def _blob(n: int, seed: int) -> tuple[str, bytes]:
    data = np.random.default_rng(seed).bytes(n)
    return sha256_hex(data), data


def _files(root) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def test_large_objects_go_apart_small_and_shared_ones_stay_in_objects(tmp_path):
    store = FilesystemStore(tmp_path / "s")
    big_id, big = _blob(SCOPED_MIN_BYTES, 1)
    small_id, small = _blob(1000, 2)
    shared_id, shared = _blob(2 * SCOPED_MIN_BYTES, 3)
    store.put(shared_id, shared)  # e.g. a chunk of the model the ClientApp was sent
    scope = store.reply_scope(SCOPE)
    assert isinstance(scope, ReplyScope)
    assert scope.put(big_id, big, trusted=True) == len(big)
    assert scope.put(big_id, big, trusted=True) == 0  # once
    assert scope.put(small_id, small) == len(small)
    assert scope.put(shared_id, shared) == 0  # the store's copy is the reply's
    assert _files(tmp_path / "s") == sorted([
        f"objects/{shared_id[:2]}/{shared_id}", f"objects/{small_id[:2]}/{small_id}",
        f"replies/{big_id[:2]}/{big_id}.{SCOPE}"])
    assert not store.has(big_id)  # no other message or reply can find it

    # the server reads the reply through its scope: its own files first, then the store
    reader = store.for_reply(SCOPE)
    assert [reader.get(i) for i in (big_id, small_id, shared_id)] == [big, small, shared]
    assert [reader.reply_size(i) for i in (big_id, small_id)] == [len(big), len(small)]
    assert store.for_reply(None) is store  # a result without a scope
    with pytest.raises(PayloadMissingError):
        store.get(big_id)

    # dropping removes the reply's own files and nothing shared
    reader.drop([big_id, small_id, shared_id])
    assert settle_reply_drops()
    deadline = time.monotonic() + 5
    while (tmp_path / "s" / "replies" / big_id[:2] / f"{big_id}.{SCOPE}").exists():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert _files(tmp_path / "s") == sorted([
        f"objects/{shared_id[:2]}/{shared_id}", f"objects/{small_id[:2]}/{small_id}"])


def test_a_scope_or_id_from_a_site_is_never_a_path(tmp_path):
    store = FilesystemStore(tmp_path / "s")
    for bad in ("../" + "a" * 61, "A" * 64, "a" * 63, ""):
        with pytest.raises(InvalidObjectIdError):
            store.for_reply(bad) if bad else ReplyScope(store, bad)
    with pytest.raises(InvalidObjectIdError):
        store.for_reply(SCOPE).paths(["../../etc/passwd"])


def test_other_stores_keep_replies_where_they_are(tmp_path):
    from flwr_hpc.payload.inline import InlineSiteStore
    from flwr_hpc.payload.store import TransferSiteStore

    transfer_site = TransferSiteStore(tmp_path / "t")  # the server fetches objects/ paths
    assert transfer_site.reply_scope(SCOPE) is transfer_site
    inline_site = InlineSiteStore({})
    assert inline_site.reply_scope(SCOPE) is inline_site


def test_drop_is_off_the_callers_thread_and_survives_a_file_it_cannot_remove(tmp_path):
    gone = tmp_path / "a"
    gone.write_bytes(b"x")
    missing = tmp_path / "never-there"
    not_a_file = tmp_path / "d"
    not_a_file.mkdir()
    drop_reply_files([missing, not_a_file, gone])
    deadline = time.monotonic() + 5
    while gone.exists():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert not_a_file.is_dir()  # left (gc reports it), and the thread goes on:
    again = tmp_path / "b"
    again.write_bytes(b"y")
    drop_reply_files([again])
    while again.exists():
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_gc_removes_reply_files_never_collected(tmp_path):
    from flwr_hpc.control.gc import _collect_store

    store = FilesystemStore(tmp_path / "s")
    old_id, old = _blob(SCOPED_MIN_BYTES, 4)
    new_id, new = _blob(SCOPED_MIN_BYTES, 5)
    store.reply_scope(SCOPE).put(old_id, old)
    store.reply_scope("cd" * 32).put(new_id, new)
    old_path = store.for_reply(SCOPE).path(old_id)
    os.utime(old_path, (time.time() - 7200, time.time() - 7200))  # a killed run's
    removed: list = []
    n, nbytes = _collect_store(tmp_path / "s", time.time() - 3600, False, removed)
    assert (n, nbytes, removed) == (1, len(old), [old_path])
    assert store.for_reply("cd" * 32).get(new_id) == new  # a live run's reply stays


def test_the_server_chooses_and_an_older_server_gets_every_reply_in_objects(tmp_path):
    from flwr_hpc.payload.store import open_store

    server = FilesystemStore(tmp_path / "s")
    assert server.spec()["scoped_replies"] is True
    site = open_store(server.spec())
    assert isinstance(site.reply_scope(SCOPE), ReplyScope)
    older = {k: v for k, v in server.spec().items() if k != "scoped_replies"}
    site = open_store(older)  # a spec without the key: a server that reads objects/ only
    assert site.reply_scope(SCOPE) is site


def _finished_task(result_for):
    from concurrent.futures import Future

    from flwr.app import Message, RecordDict

    from flwr_hpc.config import ClientSlot
    from flwr_hpc.server.tasks import Task

    message = Message(RecordDict(), dst_node_id=1, message_type="train")
    mid = "ef" * 32
    future: Future = Future()
    future.set_result(result_for(mid))
    return Task(message=message, message_id=mid,
                node=ClientSlot(node_id=1, site="s", slot=0, partition_id=0, node_config={}),
                future=future)


def test_a_result_naming_another_messages_scope_is_rejected_and_removes_nothing(tmp_path):
    from flwr.common.constant import ErrorCode

    from flwr_hpc.server.replies import collect, discard

    store = FilesystemStore(tmp_path / "s")
    other_id, other = _blob(SCOPED_MIN_BYTES, 6)
    store.reply_scope(SCOPE).put(other_id, other)  # another message's reply, still in use
    outcomes = []
    task = _finished_task(lambda mid: {"ok": True, "message_id": mid, "reply_id": other_id,
                                       "reply_scope": SCOPE, "object_ids": [other_id]})
    reply = collect(task, store, "round 1", lambda t, outcome, **kw: outcomes.append(outcome))
    assert reply.has_error() and reply.error.code == ErrorCode.REPLY_MESSAGE_UNAVAILABLE
    assert "reply scope" in reply.error.reason and outcomes == ["error:REPLY_MESSAGE_UNAVAILABLE"]
    discard(task, store)  # e.g. the same result arriving late
    assert settle_reply_drops()
    assert store.for_reply(SCOPE).get(other_id) == other
