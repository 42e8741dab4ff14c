"""A reply's large objects are kept apart in a filesystem store and removed once used
(#22: every reply kept for the run filled the page cache with dirty pages)."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

from flwr_hpc.errors import InvalidObjectIdError, PayloadMissingError
from flwr_hpc.payload.objects import sha256_hex
from flwr_hpc.payload.reply_files import (
    SCOPED_MIN_BYTES,
    ReplyScope,
    drop_reply_files,
    settle_reply_drops,
)
from flwr_hpc.payload.store import FilesystemStore

SCOPE = "ab" * 32


def _blob(n: int, seed: int) -> tuple[str, bytes]:
    data = np.random.default_rng(seed).bytes(n)
    return sha256_hex(data), data


def _files(root) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def test_large_objects_go_apart_small_and_shared_ones_stay_in_objects(tmp_path):
    # the per-object layout: what a site worker writes for an older server
    store = FilesystemStore(tmp_path / "s", reply_packs=False)
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

    # the per-object layout: what a site worker writes for an older server
    store = FilesystemStore(tmp_path / "s", reply_packs=False)
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
    from flwr.supercore.task_identity import TaskIdentity

    # Flower's Message needs a task identity (was left to whichever test ran before)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 7, 1, 3

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

    # the per-object layout: what a site worker writes for an older server
    store = FilesystemStore(tmp_path / "s", reply_packs=False)
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


def _packed_reply(store, scope=SCOPE, objects=()):
    """Write ``objects`` as the site worker does; return (writer, index)."""
    writer = store.reply_scope(scope)
    sizes = [writer.put(oid, data, trusted=True) for oid, data in objects]
    return writer, sizes, writer.close_reply()


def test_a_packed_reply_is_one_file_read_through_its_index(tmp_path):
    store = FilesystemStore(tmp_path / "s")
    assert store.spec()["reply_packs"] is True  # the server asks for packs
    big_id, big = _blob(SCOPED_MIN_BYTES, 1)
    small_id, small = _blob(1000, 2)
    shared_id, shared = _blob(3000, 3)
    store.put(shared_id, shared)  # e.g. a chunk of the model the ClientApp was sent
    writer, sizes, index = _packed_reply(
        store, objects=[(small_id, small), (big_id, big), (shared_id, shared),
                        (small_id, small)])
    assert isinstance(writer, ReplyScope) and writer.packing
    assert sizes == [len(small), len(big), 0, 0]  # shared and repeated objects: not again
    assert index == {small_id: [0, len(small)], big_id: [len(small), len(big)]}
    # one file for the reply (no temporary one left), the shared object where it was
    assert _files(tmp_path / "s") == sorted([f"objects/{shared_id[:2]}/{shared_id}",
                                             f"replies/{SCOPE[:2]}/{SCOPE}.pack"])
    assert not store.has(big_id) and not store.has(small_id)
    assert store.bytes_written == len(shared) + len(small) + len(big)

    # the server reads through the scope and the index the result carried
    reader = store.for_reply(SCOPE, index)
    assert [reader.get(i) for i in (big_id, small_id, shared_id)] == [big, small, shared]
    assert [reader.reply_size(i) for i in (big_id, small_id, shared_id)] == [
        len(big), len(small), len(shared)]
    assert reader.paths([big_id, small_id, shared_id]) == [writer.pack_path]
    reader.drop([big_id, small_id, shared_id])
    assert settle_reply_drops()
    assert _files(tmp_path / "s") == [f"objects/{shared_id[:2]}/{shared_id}"]


def test_a_reply_with_nothing_new_makes_no_pack(tmp_path):
    store = FilesystemStore(tmp_path / "s")
    oid, data = _blob(100, 1)
    store.put(oid, data)
    _, sizes, index = _packed_reply(store, objects=[(oid, data)])
    assert sizes == [0] and index == {}
    assert not (tmp_path / "s" / "replies").exists() or _files(tmp_path / "s" / "replies") == []
    assert store.for_reply(SCOPE, index).get(oid) == data


@pytest.mark.parametrize("bad", [["0", "10"], [0, -1], [-1, 10], [0, 1, 2], [True, 10],
                                 "0,10", None])
def test_a_hostile_pack_index_is_refused(tmp_path, bad):
    from flwr_hpc.errors import FlwrHpcError

    store = FilesystemStore(tmp_path / "s")
    oid, data = _blob(100, 1)
    _, _, index = _packed_reply(store, objects=[(oid, data)])
    assert index == {oid: [0, 100]}
    if bad is None:  # not a mapping at all
        reader = store.for_reply(SCOPE, [[0, 100]])
    else:
        reader = store.for_reply(SCOPE, {oid: bad})
    with pytest.raises(FlwrHpcError, match="pack index"):
        reader.get(oid)


def test_pack_bytes_are_verified_by_sha256(tmp_path):
    from flwr_hpc.errors import PayloadIntegrityError

    store = FilesystemStore(tmp_path / "s")
    a_id, a = _blob(100, 1)
    b_id, b = _blob(100, 2)
    writer, _, index = _packed_reply(store, objects=[(a_id, a), (b_id, b)])
    # past the end of the pack: missing, never a short read used
    with pytest.raises(PayloadMissingError):
        store.for_reply(SCOPE, {a_id: [150, 100]}).get(a_id)
    assert store.for_reply(SCOPE, index).get(b_id) == b
    # a flipped byte in the pack (a torn write, a hostile site): refused, and the pack
    # kept aside in quarantine/ (the reply is rejected; nothing reads it again)
    raw = bytearray(writer.pack_path.read_bytes())
    raw[5] ^= 0xFF
    writer.pack_path.write_bytes(bytes(raw))
    with pytest.raises(PayloadIntegrityError):
        store.for_reply(SCOPE, index).get(a_id)
    assert not writer.pack_path.exists()
    assert [p.name.split(".")[:2] for p in (tmp_path / "s" / "quarantine").iterdir()] == [
        [SCOPE, "pack"]]
    with pytest.raises(PayloadMissingError):
        store.for_reply(SCOPE, index).get(b_id)
    # an index that points one object at another's bytes: refused, never used
    writer, _, index = _packed_reply(store, "cd" * 32, [(a_id, a), (b_id, b)])
    with pytest.raises(PayloadIntegrityError):
        store.for_reply("cd" * 32, {a_id: index[b_id]}).get(a_id)


def test_an_older_server_gets_per_object_files_and_a_failed_pack_leaves_nothing(tmp_path):
    from flwr_hpc.payload.store import open_store

    server = FilesystemStore(tmp_path / "s")
    older = {k: v for k, v in server.spec().items() if k != "reply_packs"}
    site = open_store(older)  # a server that knows scopes but not packs
    writer = site.reply_scope(SCOPE)
    assert isinstance(writer, ReplyScope) and not writer.packing
    big_id, big = _blob(SCOPED_MIN_BYTES, 1)
    writer.put(big_id, big, trusted=True)
    assert writer.close_reply() is None  # the result then carries no index
    assert _files(tmp_path / "s") == [f"replies/{big_id[:2]}/{big_id}.{SCOPE}"]
    assert server.for_reply(SCOPE).get(big_id) == big

    # a write that fails half-way (here: data that cannot be written) leaves no file
    packed = open_store(server.spec()).reply_scope("cd" * 32)
    oid, data = _blob(100, 2)
    packed.put(oid, data, trusted=True)
    with pytest.raises(TypeError):
        packed.put("ef" * 32, 12345, trusted=True)
    assert [p for p in (tmp_path / "s" / "replies").rglob("*") if "cd" * 8 in p.name] == []


def test_gc_removes_a_pack_never_collected_and_keeps_a_live_one(tmp_path):
    from flwr_hpc.control.gc import _collect_store

    store = FilesystemStore(tmp_path / "s")
    old_id, old = _blob(1000, 4)
    new_id, new = _blob(1000, 5)
    old_writer, _, _ = _packed_reply(store, SCOPE, [(old_id, old)])
    _, _, new_index = _packed_reply(store, "cd" * 32, [(new_id, new)])
    os.utime(old_writer.pack_path, (time.time() - 7200, time.time() - 7200))  # a killed run's
    removed: list = []
    n, nbytes = _collect_store(tmp_path / "s", time.time() - 3600, False, removed)
    assert (n, nbytes, removed) == (1, len(old), [old_writer.pack_path])
    assert store.for_reply("cd" * 32, new_index).get(new_id) == new  # a live run's stays


def test_a_result_naming_another_messages_packed_reply_is_rejected_and_keeps_it(tmp_path):
    from flwr_hpc.server.replies import collect, discard

    store = FilesystemStore(tmp_path / "s")
    other_id, other = _blob(1000, 6)
    writer, _, index = _packed_reply(store, SCOPE, [(other_id, other)])  # still in use
    outcomes = []
    task = _finished_task(lambda mid: {"ok": True, "message_id": mid, "reply_id": other_id,
                                       "reply_scope": SCOPE, "reply_pack": index,
                                       "object_ids": [other_id]})
    reply = collect(task, store, "round 1", lambda t, outcome, **kw: outcomes.append(outcome))
    assert reply.has_error() and "reply scope" in reply.error.reason
    discard(task, store)
    assert settle_reply_drops()
    assert writer.pack_path.is_file()
    assert store.for_reply(SCOPE, index).get(other_id) == other
