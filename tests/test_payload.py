"""Payload plane: content addressing, verification, atomic writes, dedup."""

from __future__ import annotations

import errno
import os

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from flwr_hpc.errors import InvalidObjectIdError, PayloadIntegrityError, PayloadMissingError
from flwr_hpc.payload import FilesystemStore, inflate_message, message_objects, sha256_hex


@pytest.fixture(autouse=True)
def _identity():
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 7, 1, 3


def test_put_get_roundtrip_and_dedup(tmp_path):
    store = FilesystemStore(tmp_path / "s", site="alpha")
    data = b"hello site"
    oid = sha256_hex(data)
    assert store.put(oid, data) == len(data)
    assert store.put(oid, data) == 0  # already held: nothing written
    assert store.get(oid) == data
    assert store.bytes_written == len(data) and store.objects_written == 1


def test_corrupted_object_is_rejected_and_quarantined(tmp_path):
    store = FilesystemStore(tmp_path / "s", site="alpha")
    data = b"x" * 1000
    oid = sha256_hex(data)
    store.put(oid, data)
    path = store.objects_dir / oid[:2] / oid
    path.write_bytes(b"y" + data[1:])
    with pytest.raises(PayloadIntegrityError) as info:
        store.get(oid)
    assert info.value.object_id == oid
    assert info.value.actual == sha256_hex(b"y" + data[1:])
    assert not store.has(oid)  # moved aside so a later stage can replace it
    assert len(list((store.root / "quarantine").iterdir())) == 1
    assert store.put(oid, data) == len(data) and store.get(oid) == data


@pytest.mark.parametrize("bad", ["../../etc/passwd", "A" * 64, "abc", "0" * 63 + "/",
                                 "../" + "0" * 61, 123])
def test_invalid_object_ids_are_refused(tmp_path, bad):
    store = FilesystemStore(tmp_path / "s")
    with pytest.raises(InvalidObjectIdError):
        store.get(bad)
    with pytest.raises(InvalidObjectIdError):
        store.put(bad, b"data")
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == []


def test_wrong_bytes_for_id_are_never_stored(tmp_path):
    store = FilesystemStore(tmp_path / "s")
    oid = sha256_hex(b"right")
    with pytest.raises(PayloadIntegrityError):
        store.put(oid, b"wrong")
    with pytest.raises(PayloadMissingError):
        store.get(oid)


def test_failed_write_leaves_no_partial_object(tmp_path, monkeypatch):
    store = FilesystemStore(tmp_path / "s")
    data = os.urandom(4096)
    oid = sha256_hex(data)

    def disk_full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError):
        store.put(oid, data)
    assert not store.has(oid)
    assert [p for p in store.objects_dir.rglob("*") if p.is_file()] == []


def test_message_roundtrip_through_store(tmp_path):
    store = FilesystemStore(tmp_path / "s")
    arrays = [np.arange(10, dtype=np.float32), np.ones((3, 4))]
    msg = Message(RecordDict({"arrays": ArrayRecord(arrays),
                              "config": ConfigRecord({"lr": 0.1})}), 99, "train")
    for oid, data in message_objects(msg).items():
        store.put(oid, data)
    back = inflate_message(msg.object_id, store.get)
    assert back.metadata.message_id == msg.object_id
    assert back.metadata.dst_node_id == 99
    got = back.content["arrays"].to_numpy_ndarrays()
    np.testing.assert_array_equal(got[0], arrays[0])
    np.testing.assert_array_equal(got[1], arrays[1])
    assert back.content["config"]["lr"] == 0.1


def test_shared_model_is_one_set_of_objects():
    rng = np.random.default_rng(1)  # random: identical zero chunks would deduplicate
    model = ArrayRecord([rng.standard_normal(8 * 1024 * 1024, dtype=np.float32)])  # 32 MiB
    content = RecordDict({"arrays": model})
    msgs = [Message(content, node, "train") for node in (11, 12, 13)]
    union: dict[str, bytes] = {}
    for m in msgs:
        union.update(message_objects(m))
    total = sum(len(v) for v in union.values())
    assert 32 * 2**20 <= total < 32.1 * 2**20  # ~32 MiB, not ~96 MiB


def test_worker_reads_a_large_object_once_per_process_and_bounds_its_cache(tmp_path,
                                                                           monkeypatch):
    from flwr_hpc import worker

    store = FilesystemStore(tmp_path / "s")
    big = [bytes([i]) * (3 << 20) for i in range(3)]
    small = b"tiny"
    ids = [sha256_hex(b) for b in big]
    for oid, data in zip(ids, big, strict=True):
        store.put(oid, data)
    store.put(sha256_hex(small), small)
    calls = []
    real_get = store.get
    monkeypatch.setattr(store, "get", lambda oid: calls.append(oid) or real_get(oid))
    monkeypatch.setattr(worker, "_cache", __import__("collections").OrderedDict())
    monkeypatch.setattr(worker, "_cache_bytes", 0)
    monkeypatch.setattr(worker, "_CACHE_LIMIT", 7 << 20)  # room for two big objects
    read = worker.cached_reader(store)
    assert [read(ids[0]), read(ids[0]), read(sha256_hex(small)), read(sha256_hex(small))] == [
        big[0], big[0], small, small]
    assert calls == [ids[0], sha256_hex(small), sha256_hex(small)]  # small ones not cached
    read(ids[1])
    read(ids[2])  # evicts ids[0], the least recently used
    assert list(worker._cache) == [ids[1], ids[2]] and worker._cache_bytes == 6 << 20
    read(ids[0])
    assert calls.count(ids[0]) == 2
