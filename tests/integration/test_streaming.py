"""Streaming aggregation: same results as Flower's strategies, O(model) replies alive."""

from __future__ import annotations

import gc
import time
import weakref

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdam, FedAvg
from helpers import fed_of, train_messages

from flwr_hpc.strategy.streaming import StreamingFedAdam, StreamingFedAvg


@pytest.fixture(autouse=True)
def _task_identity():
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 7, 1, 1


def _replies(n: int, seed: int, alive: list | None = None):
    rng = np.random.default_rng(seed)
    for i in range(n):
        request = Message(RecordDict(), dst_node_id=100 + i, message_type="train")
        arrays = {"w": rng.normal(size=(64, 32)).astype(np.float32),
                  "b": rng.normal(size=32).astype(np.float32) * 10}
        record = ArrayRecord({k: Array(v) for k, v in arrays.items()})
        metrics = MetricRecord({"num-examples": int(rng.integers(1, 500)),
                                "train_loss": float(rng.random())})
        reply = Message(RecordDict({"arrays": record, "metrics": metrics}), reply_to=request)
        if alive is not None:
            alive.append(weakref.ref(record))
        del record
        yield reply


def test_streaming_fedavg_equals_flowers_fedavg_on_the_same_replies():
    want_arrays, want_metrics = FedAvg().aggregate_train(1, list(_replies(40, 1)))
    got_arrays, got_metrics = StreamingFedAvg().aggregate_train(1, _replies(40, 1))
    for key in ("w", "b"):
        np.testing.assert_allclose(got_arrays[key].numpy(), want_arrays[key].numpy(),
                                   rtol=1e-6, atol=1e-7)
        assert got_arrays[key].numpy().dtype == np.float32
    assert got_metrics["train_loss"] == pytest.approx(want_metrics["train_loss"], rel=1e-9)


def test_streaming_fedadam_equals_flowers_fedadam_over_two_rounds():
    init = ArrayRecord({"w": Array(np.zeros((64, 32), np.float32)),
                        "b": Array(np.zeros(32, np.float32))})
    results = []
    for cls in (FedAdam, StreamingFedAdam):
        strategy, arrays = cls(), init
        for rnd in (1, 2):
            strategy.current_arrays = {k: a.numpy() for k, a in arrays.items()}
            arrays, _ = strategy.aggregate_train(rnd, _replies(12, rnd) if cls is
                                                 StreamingFedAdam else list(_replies(12, rnd)))
        results.append(arrays)
    for key in ("w", "b"):
        # Adam's m / (sqrt(v) + tau) amplifies the float32 rounding of the average
        np.testing.assert_allclose(results[1][key].numpy(), results[0][key].numpy(),
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.slow(20)
def test_streaming_holds_one_reply_at_a_time_flower_holds_all():
    def peak_alive(strategy, as_list: bool) -> int:
        alive: list = []
        peak = 0

        def watched():
            nonlocal peak
            for reply in _replies(30, 3, alive):
                gc.collect()
                peak = max(peak, sum(r() is not None for r in alive))
                yield reply

        strategy.aggregate_train(1, list(watched()) if as_list else watched())
        return peak

    assert peak_alive(StreamingFedAvg(), as_list=False) <= 2
    assert peak_alive(FedAvg(), as_list=True) == 30  # the control: a list holds them all


def test_streaming_frees_each_reply_itself_despite_flowers_reference_cycles():
    """``content.array_records`` makes a self-referencing ``_SyncedDict`` that keeps the
    reply's RecordDict alive until a collection; the strategy's young-generation collection
    is what frees it (automatic collection off here)."""
    alive: list = []
    peak = 0

    def watched():
        nonlocal peak
        for reply in _replies(30, 4, alive):
            peak = max(peak, sum(r() is not None for r in alive))
            yield reply

    gc.collect()
    gc.disable()
    try:
        StreamingFedAvg().aggregate_train(1, watched())
        # the control: touching array_records without a collection leaks the record
        kept = list(_replies(1, 5, alive))
        _ = kept[0].content.array_records
        del kept, _
        leaked = alive[-1]() is not None
    finally:
        gc.enable()
    assert peak <= 2
    assert leaked  # so the assertion above is not vacuous


@pytest.mark.parametrize("make", [
    lambda r: r.standard_normal((7, 5), dtype=np.float32),
    lambda r: np.asfortranarray(r.standard_normal((6, 4))),
    lambda r: r.integers(-9, 9, size=(3, 2, 4)).astype(np.int16),
    lambda r: r.random(11) > 0.5,
    lambda r: np.array(r.random(), dtype=np.float16),  # 0-d
    lambda r: np.zeros((0, 3), np.float32),
])
def test_ndarray_view_is_numpy_without_the_copy(make):
    from flwr_hpc.strategy.streaming import ndarray_view

    arr = Array(make(np.random.default_rng(0)))
    view, copy = ndarray_view(arr), arr.numpy()
    assert view.dtype == copy.dtype and view.shape == copy.shape
    np.testing.assert_array_equal(view, copy)
    if view.size:
        assert np.shares_memory(view, np.frombuffer(arr.data, dtype=np.uint8))
        assert not view.flags.writeable


@pytest.mark.parametrize("n", [10, (1 << 20) * 3 + 17])
def test_blocked_accumulation_is_bit_identical(n):
    from flwr_hpc.strategy.streaming import _accumulate

    rng = np.random.default_rng(n)
    total = rng.standard_normal(n) * 3
    want = total.copy()
    values = rng.standard_normal(n, dtype=np.float32)
    weight = np.float64(37.0)
    want += values * weight
    _accumulate(total, values, weight)
    assert np.array_equal(total, want)


def test_hpc_grid_yields_each_reply_when_it_arrives(grid_factory):
    grid = grid_factory(fed_of({"a": 2}, engine="thread-pool"))
    grid._run_config.update({"sleep-partition": 1, "sleep-s": 4.0})
    t0 = time.monotonic()
    replies = grid.stream_replies(train_messages(grid, 1), timeout=60)
    first = next(replies)
    first_at = time.monotonic() - t0
    rest = list(replies)
    assert first_at < 3.0 and time.monotonic() - t0 >= 4.0
    assert len(rest) == 1 and not first.has_error() and not rest[0].has_error()


def test_send_and_receive_returns_flowers_list(grid_factory):
    """Flower's contract: a list (iterated twice, len() taken by Flower's workflows)."""
    grid = grid_factory(fed_of({"a": 2}, engine="thread-pool"))
    replies = grid.send_and_receive(train_messages(grid, 1), timeout=60)
    assert isinstance(replies, list) and len(replies) == 2
    assert sorted(r.metadata.src_node_id for r in replies) == sorted(grid.get_node_ids())


def _stored(replies, root):
    """The replies as the grid yields them to a streaming strategy: through a site store,
    their arrays read when first used."""
    from flwr_hpc.payload import FilesystemStore, inflate_message
    from flwr_hpc.payload.objects import message_parts

    store = FilesystemStore(root)
    out = []
    for reply in replies:
        for oid, data in message_parts(reply).items():
            store.put(oid, data, trusted=True)
        out.append(inflate_message(reply.object_id, store.get, stored=store.reply_size))
    return store, out


def test_a_reply_unreadable_mid_aggregation_is_taken_out_again(tmp_path, caplog):
    from flwr_hpc.payload.objects import StoredArray

    replies = list(_replies(6, seed=3))
    store, stored = _stored(replies, tmp_path / "s")
    bad = stored[3].content["arrays"]
    assert all(isinstance(a, StoredArray) for a in bad.values())
    assert list(bad.keys()) == ["w", "b"]  # "w" is added before "b" fails
    chunk = store._path(bad["b"].__dict__["_chunk_ids"][0])
    chunk.write_bytes(chunk.read_bytes()[:-1] + b"\x00")  # changed after it was received
    arrays, metrics = StreamingFedAvg().aggregate_train(1, iter(stored))
    # the five good replies' average, bit for bit (reply 3's "w" was taken out again), and
    # Flower's FedAvg over them
    good = [r for i, r in enumerate(replies) if i != 3]
    exact, _ = StreamingFedAvg().aggregate_train(1, iter(good))
    want, _ = FedAvg().aggregate_train(1, good)
    for key in ("w", "b"):
        np.testing.assert_array_equal(arrays[key].numpy(), exact[key].numpy())
        np.testing.assert_allclose(arrays[key].numpy(), want[key].numpy(), rtol=1e-6,
                                   atol=1e-7)
    with_bad, _ = FedAvg().aggregate_train(1, replies)
    assert not np.allclose(arrays["w"].numpy(), with_bad["w"].numpy(), rtol=1e-4)
    assert "reply of node 103 dropped from the aggregation" in caplog.text
    assert "sha256" in caplog.text


def test_streaming_reads_one_stored_array_at_a_time(tmp_path):
    """With arrays read on first use and released after, the server holds one array of
    one reply at a time (the eager control holds a whole reply)."""
    from flwr_hpc.payload.objects import StoredArray

    replies = list(_replies(5, seed=4))
    _, stored = _stored(replies, tmp_path / "s")
    peak = 0

    def watched():
        nonlocal peak
        for msg in stored:
            arrays = list(msg.content["arrays"].values())
            yield msg
            peak = max(peak, sum(a.loaded for a in arrays))

    original = StoredArray.release

    def release(self):  # the moment an array is done with: how many are loaded now
        nonlocal peak
        peak = max(peak, sum(a.loaded for m in stored for a in m.content["arrays"].values()))
        original(self)

    StoredArray.release = release
    try:
        arrays, _ = StreamingFedAvg().aggregate_train(1, watched())
    finally:
        StoredArray.release = original
    assert peak <= 2  # the array being added and the next one, read ahead
    want, _ = StreamingFedAvg().aggregate_train(1, iter(replies))  # eager: the same bits
    for key in ("w", "b"):
        np.testing.assert_array_equal(arrays[key].numpy(), want[key].numpy())


def test_only_a_streaming_consumer_gets_stored_arrays(grid_factory):
    from flwr_hpc.payload.objects import StoredArray
    from flwr_hpc.strategy.streaming_grid import StreamingGrid

    grid = grid_factory(fed_of({"a": 2}, engine="thread-pool"))

    def kinds(replies):
        return {type(a) for r in replies for a in r.content["arrays"].values()}

    streamed = list(StreamingGrid(grid).send_and_receive(train_messages(grid, 1), timeout=60))
    assert len(streamed) == 2 and kinds(streamed) == {StoredArray}
    listed = grid.send_and_receive(train_messages(grid, 1), timeout=60)
    assert len(listed) == 2 and kinds(listed) == {Array}
    by_node = {r.metadata.src_node_id: r.content["arrays"]["0"].numpy() for r in listed}
    for r in streamed:  # the same message again: the same values either way
        np.testing.assert_array_equal(r.content["arrays"]["0"].numpy(),
                                      by_node[r.metadata.src_node_id])


def test_release_initial_frees_the_initial_model_after_round_1(grid_factory):
    """Flower's round loop keeps ``initial_arrays`` for the whole run; with
    ``release_initial`` the record is emptied once round 2 has its own model -- the same
    result, one model fewer on the server."""
    from flwr_hpc.strategy.streaming_grid import StreamingGrid

    def run(release: bool):
        grid = grid_factory(fed_of({"a": 2, "b": 1}, engine="thread-pool"))
        initial = ArrayRecord([np.arange(6, dtype=np.float32)])
        alive = [weakref.ref(a) for a in initial.values()]
        sizes: list[int] = []
        strategy = StreamingFedAvg(fraction_evaluate=0.0, min_available_nodes=3)

        def evaluate_fn(server_round, arrays):  # what the initial record holds, per round
            sizes.append(len(initial))
            return None

        result = strategy.start(grid=StreamingGrid(grid), initial_arrays=initial,
                                num_rounds=3, timeout=60, evaluate_fn=evaluate_fn,
                                **({"release_initial": True} if release else {}))
        gc.collect()
        return result, sizes, [r() is not None for r in alive], initial

    kept, kept_sizes, kept_alive, kept_initial = run(False)
    freed, freed_sizes, freed_alive, freed_initial = run(True)
    # the same model either way
    np.testing.assert_array_equal(freed.arrays["0"].numpy(), kept.arrays["0"].numpy())
    assert len(freed.train_metrics_clientapp) == len(kept.train_metrics_clientapp) == 3
    # round 0 and 1 still had it; from round 2's configure_train on it is gone
    assert kept_sizes == [1, 1, 1, 1] and freed_sizes == [1, 1, 0, 0]
    assert kept_alive == [True] and freed_alive == [False]
    assert len(kept_initial) == 1 and len(freed_initial) == 0
