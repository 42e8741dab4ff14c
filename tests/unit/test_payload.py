"""Payload plane: content addressing, verification, atomic writes, dedup."""

from __future__ import annotations

import errno
import os

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.task_identity import TaskIdentity

from flwr_hpc.errors import InvalidObjectIdError, PayloadIntegrityError, PayloadMissingError
from flwr_hpc.payload import FilesystemStore, inflate_message, message_objects, sha256_hex
from flwr_hpc.payload.objects import ArrayCache, fast_object_ids, message_parts
from flwr_hpc.payload.store import open_store


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
    store = FilesystemStore(tmp_path / "s", fsync=True)
    data = os.urandom(4096)
    oid = sha256_hex(data)

    def disk_full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError):
        store.put(oid, data)
    assert not store.has(oid)
    assert [p for p in store.objects_dir.rglob("*") if p.is_file()] == []
    # without fsync: a failure half-way through the parts (the first part was written)
    plain = FilesystemStore(tmp_path / "p")
    with pytest.raises(TypeError):
        plain.put(oid, (data[:100], 12345), trusted=True)
    assert not plain.has(oid)
    assert [p for p in plain.objects_dir.rglob("*") if p.is_file()] == []


def test_parts_are_written_as_their_concatenation(tmp_path):
    store = FilesystemStore(tmp_path / "s")
    body = np.arange(1000, dtype=np.float32)
    parts = (b"head\x00", memoryview(body.tobytes())[40:], bytearray(b"tail"))
    data = b"head\x00" + body.tobytes()[40:] + b"tail"
    oid = sha256_hex(data)
    assert sha256_hex(parts) == oid
    assert store.put(oid, parts) == len(data)  # verified (not trusted) from the parts
    assert store.get(oid) == data
    with pytest.raises(PayloadIntegrityError):
        store.put(sha256_hex(b"other"), parts)
    assert store.spec()["fsync"] is False
    assert open_store(store.spec()).fsync is False
    assert open_store(FilesystemStore(tmp_path / "f", fsync=True).spec()).fsync is True


def _flower_objects(msg: Message) -> dict[str, bytes]:
    """Flower's own deflate, object by object (the reference for our codec)."""
    return {oid: obj.deflate() for oid, obj in get_all_nested_objects(msg).items()}


def _odd_message() -> Message:
    rng = np.random.default_rng(5)
    arrays = {
        "multi": rng.standard_normal(3 * 2**20 + 7, dtype=np.float32),  # 3 chunks, last short
        "zeros": np.zeros(3 * 2**20, dtype=np.float32),  # identical chunks: one id, twice
        "empty": np.zeros((0, 4), dtype=np.float64),
        "ints": np.arange(12, dtype=np.int16).reshape(3, 4),
    }
    record = ArrayRecord({k: Array(v) for k, v in arrays.items()})
    msg = Message(RecordDict({"arrays": record,
                              "config": ConfigRecord({"server-round": 3})}), 42, "train")
    msg.metadata.__dict__["_created_at"] = 1.5e9  # fresh objects, identical bytes
    return msg


def test_codec_bytes_and_ids_equal_flowers():
    reference = _flower_objects(_odd_message())
    assert len(reference) >= 8
    msg = _odd_message()
    parts = message_parts(msg)
    assert list(parts) == list(reference)  # same ids, same (post-)order: root last
    for oid, body in parts.items():
        joined = b"".join(body)
        assert joined == reference[oid]
        assert sha256_hex(joined) == oid
    assert next(reversed(parts)) == _odd_message().object_id
    assert message_objects(_odd_message()) == reference
    chunks = [p for p in parts.values() if bytes(p[0]).startswith(b"ArrayChunk ")]
    assert len(chunks) >= 4 and all(isinstance(p[1], memoryview) for p in chunks)
    # ids stay right after the block, for Flower's own (recomputing) object_id
    with fast_object_ids(msg):
        inside = msg.object_id
    assert inside == msg.object_id == next(reversed(parts))
    msg.content["config"]["server-round"] = 4  # changed outside the block: new id
    assert msg.object_id != inside


def test_codec_inflate_restores_arrays_and_ids(tmp_path):
    store = FilesystemStore(tmp_path / "s")
    msg = _odd_message()
    for oid, data in message_parts(msg).items():
        store.put(oid, data, trusted=True)
    back = inflate_message(msg.object_id, store.get)
    assert back.metadata.message_id == msg.object_id
    for key, arr in msg.content["arrays"].items():
        got = back.content["arrays"][key]
        assert (got.dtype, got.shape, got.stype) == (arr.dtype, arr.shape, arr.stype)
        assert got.data == arr.data
        np.testing.assert_array_equal(got.numpy(), arr.numpy())
    assert back.content["config"]["server-round"] == 3
    back.metadata.__dict__["_message_id"] = ""  # as on the sending side
    assert back.object_id == msg.object_id  # re-deflates to the same tree


def test_codec_refuses_an_array_whose_head_lies(tmp_path):
    import json

    store = FilesystemStore(tmp_path / "s")
    msg = _odd_message()
    objects = message_objects(msg)
    array_id = next(oid for oid, data in objects.items() if data.startswith(b"Array ")
                    and b'"shape": [3145735]' in data)
    head, body = objects[array_id].split(b"\x00", 1)
    meta = json.loads(body)
    meta["arraychunk_ids"] = [9, 9, 9]  # an index past the children it lists
    bad_body = json.dumps(meta).encode()
    kind, children, _ = head.decode().split(" ")
    bad = f"{kind} {children} {len(bad_body)}".encode() + b"\x00" + bad_body
    for oid, data in objects.items():
        store.put(oid, data)
    store.put(sha256_hex(bad), bad)
    with pytest.raises(ValueError, match="chunk indices"):
        inflate_message(sha256_hex(bad), store.get)
    with pytest.raises(TypeError, match="not a Message"):
        inflate_message(array_id, store.get)


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


def test_worker_assembles_an_array_once_per_process_and_bounds_its_cache(tmp_path):
    store = FilesystemStore(tmp_path / "s")
    rng = np.random.default_rng(2)
    models = [ArrayRecord({"w": Array(rng.standard_normal(3 << 18, dtype=np.float32))})
              for _ in range(3)]
    msgs = {}
    for i, model in enumerate(models):
        for node in (11, 12):
            m = Message(RecordDict({"arrays": model}), node, "train")
            for oid, data in message_parts(m).items():
                store.put(oid, data, trusted=True)
            msgs[i, node] = m.object_id
    calls = []
    real_get = store.get

    def counting_get(oid):
        data = real_get(oid)
        calls.append(data[:11])
        return data

    cache = ArrayCache(limit_bytes=7 << 20)  # room for two of the three models
    reads = []
    for key in [(0, 11), (0, 12), (1, 11), (2, 11), (0, 11)]:
        calls.clear()
        back = inflate_message(msgs[key], counting_get, cache=cache)
        np.testing.assert_array_equal(back.content["arrays"]["w"].numpy(),
                                      models[key[0]]["w"].numpy())
        reads.append(sum(1 for c in calls if c.startswith(b"ArrayChunk ")))
    # model 0 read once for both nodes; model 2 evicts it (LRU), so it is read again
    assert reads == [1, 0, 1, 1, 1]
    assert cache.nbytes == 2 * (3 << 20) + 2 * 128 and len(cache.keys()) == 2


def test_stored_arrays_are_read_when_first_used_and_released_after(tmp_path):
    from flwr_hpc.payload.objects import StoredArray, stored_bytes

    store = FilesystemStore(tmp_path / "s")
    msg = _odd_message()
    for oid, data in message_parts(msg).items():
        store.put(oid, data, trusted=True)
    reads: list[str] = []

    def read(oid: str) -> bytes:
        reads.append(oid)
        return store.get(oid)

    back = inflate_message(msg.object_id, read, stored=store.reply_size)
    record = back.content["arrays"]
    heads = len(reads)  # the message's tree, no array chunk yet
    assert all(isinstance(a, StoredArray) and not a.loaded for a in record.values())
    chunk_bytes = sum(store.reply_size(c) for a in record.values()
                      for c in dict.fromkeys(a.__dict__["_chunk_ids"]))
    # each chunk object once (the zeros array repeats one chunk): its body plus its head
    assert stored_bytes(back) == chunk_bytes
    sent = message_parts(msg)
    assert chunk_bytes == sum(sum(len(b) for b in sent[oid]) for oid in sent
                              if bytes(sent[oid][0][:11]) == b"ArrayChunk ")
    for key, arr in msg.content["arrays"].items():
        got = record[key]
        np.testing.assert_array_equal(got.numpy(), arr.numpy())
        assert got.loaded and got.data == arr.data
        got.release()
        assert not got.loaded
    assert len(reads) > heads and stored_bytes(back) == chunk_bytes
    # the same ids as the sent message, array by array and as a whole
    assert {k: a.object_id for k, a in record.items()} == {
        k: a.object_id for k, a in msg.content["arrays"].items()}
    back.metadata.__dict__["_message_id"] = ""
    assert back.object_id == msg.object_id
    # a store that cannot promise a later read (inline): the arrays are read at once
    eager = inflate_message(msg.object_id, store.get, stored=lambda _oid: None)
    assert not any(isinstance(a, StoredArray) for a in eager.content["arrays"].values())


def test_a_stored_array_whose_chunk_changed_is_never_used(tmp_path):
    store = FilesystemStore(tmp_path / "s")
    msg = _odd_message()
    for oid, data in message_parts(msg).items():
        store.put(oid, data, trusted=True)
    back = inflate_message(msg.object_id, store.get, stored=store.reply_size)
    arr = max(back.content["arrays"].values(), key=lambda a: a.stored_bytes)
    chunk = store._path(arr.__dict__["_chunk_ids"][-1])
    raw = bytearray(chunk.read_bytes())
    raw[-1] ^= 0xFF  # one bit flipped after the reply was received, before it is used
    chunk.write_bytes(bytes(raw))
    with pytest.raises(PayloadIntegrityError):
        arr.numpy()
    assert not chunk.exists()  # quarantined, as any object that fails its check
    with pytest.raises(PayloadMissingError):
        arr.numpy()


def test_a_model_of_small_tensors_is_assembled_once_per_worker(tmp_path):
    """4 MB in 8 tensors of 0.5 MB (the transport benchmark's S=4 layout): the second task
    of a worker reads no chunk of the global model again."""
    store = FilesystemStore(tmp_path / "s")
    model = ArrayRecord({f"l{i}": Array(np.full(2**17, i, dtype=np.float32))
                         for i in range(8)})
    ids = []
    for node in (11, 12):
        m = Message(RecordDict({"arrays": model}), node, "train")
        for oid, data in message_parts(m).items():
            store.put(oid, data, trusted=True)
        ids.append(m.object_id)
    chunks = []

    def get(oid):
        data = store.get(oid)
        chunks.extend([oid] if data.startswith(b"ArrayChunk ") else [])
        return data

    cache = ArrayCache(limit_bytes=64 << 20)
    first = inflate_message(ids[0], get, cache=cache)
    assert len(chunks) == 8
    second = inflate_message(ids[1], get, cache=cache)
    assert len(chunks) == 8  # nothing read again
    for k in model:
        np.testing.assert_array_equal(second.content["arrays"][k].numpy(),
                                      first.content["arrays"][k].numpy())
