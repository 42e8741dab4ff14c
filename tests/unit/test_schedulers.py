"""Scheduler-aware strategies: staleness weights, step budgets and merges against
hand-computed values; Deadline == FedAvg when nothing is late."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from strategies.buffered_async import BufferedAsyncFedAvg
from strategies.deadline import DeadlineFedAvg
from strategies.queue_aware import (
    QueueAwareFedAvg,
    SitePrediction,
    lr_scale,
    run_time_model,
    step_budgets,
)
from strategies.scheduled import InFlight, quorum_count, staleness_weight


@pytest.fixture(autouse=True)
def _task_identity():
    """Flower's Message() needs a task identity outside a running app."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 4242, 1, 1

# ----------------------------------------------------------------------------- weights


@pytest.mark.parametrize(("tau", "exponent", "want"), [
    (0, 0.5, 1.0), (3, 0.5, 0.5), (8, 1.0, 1 / 9), (1, 2.0, 0.25), (5, 0.0, 1.0)])
def test_staleness_weight_hand_values(tau, exponent, want):
    assert staleness_weight(tau, exponent) == pytest.approx(want, rel=1e-12)


def test_staleness_weight_refuses_negative_staleness():
    with pytest.raises(ValueError, match="staleness must be >= 0"):
        staleness_weight(-1, 0.5)


@pytest.mark.parametrize(("quorum", "asked", "want"), [
    (0.5, 4, 2), (0.5, 3, 2), (1.0, 4, 4), (0.1, 4, 1), (0.75, 4, 3), (0.5, 0, 0)])
def test_quorum_count(quorum, asked, want):
    assert quorum_count(quorum, asked) == want


# ----------------------------------------------------------------------------- budgets


def test_step_budgets_fill_the_slowest_sites_round():
    fast = SitePrediction(queue_wait_s=100, transfer_s=10, fixed_s=20, step_s=5)
    slow = SitePrediction(queue_wait_s=1000, transfer_s=10, fixed_s=20, step_s=5)
    # T = max(100+10+20+10*5, 1000+10+20+10*5) = 1080
    target, budgets = step_budgets({"fast": fast, "slow": slow, "new": None},
                                   default_steps=10, min_steps=1, max_steps=200)
    assert target == 1080
    assert budgets == {"fast": 190, "slow": 10, "new": 10}  # (1080-130)/5 = 190
    _, capped = step_budgets({"fast": fast, "slow": slow}, default_steps=10, min_steps=1,
                             max_steps=40)
    assert capped == {"fast": 40, "slow": 10}


def test_step_budgets_with_a_fixed_target_and_the_minimum():
    a = SitePrediction(queue_wait_s=50, transfer_s=0, fixed_s=0, step_s=2)
    b = SitePrediction(queue_wait_s=500, transfer_s=0, fixed_s=0, step_s=2)
    target, budgets = step_budgets({"a": a, "b": b}, default_steps=10, min_steps=3,
                                   max_steps=100, target_s=300)
    assert target == 300
    assert budgets == {"a": 100, "b": 3}  # a: (300-50)/2 = 125 -> 100; b: negative room -> 3


@pytest.mark.parametrize(("steps", "exponent", "cap", "want"), [
    (40, 0.5, 4.0, 0.5), (5, 0.5, 4.0, math.sqrt(2)), (10, 0.5, 4.0, 1.0),
    (1000, 1.0, 4.0, 0.25), (1, 1.0, 4.0, 4.0)])
def test_lr_scale_hand_values(steps, exponent, cap, want):
    assert lr_scale(steps, 10, exponent=exponent, max_scale=cap) == pytest.approx(want)


def _t(steps, run_s):
    return SimpleNamespace(steps=steps, run_s=run_s)


def test_run_time_model_fits_startup_and_per_step():
    assert run_time_model([_t(10, 170.0), _t(20, 220.0)]) == pytest.approx((120.0, 5.0))
    # one step count only: no way to split start-up from steps
    assert run_time_model([_t(10, 160.0), _t(10, 180.0)]) == pytest.approx((0.0, 17.0))
    assert run_time_model([_t(None, 10.0)]) is None


def test_ewma_hand_values():
    from flwr_hpc.server.timing import ewma

    assert ewma([10.0, 20.0], alpha=0.5) == 15.0
    assert ewma([10.0, None, 20.0, 30.0], alpha=0.5) == pytest.approx(22.5)
    assert ewma([], default=7.0) == 7.0
    with pytest.raises(ValueError):
        ewma([1.0], alpha=0.0)


class _Timings:
    def __init__(self, history):
        self._h = history

    def history(self, site, phase=None):
        return self._h.get(site, [])

    def ewma(self, site, field, alpha=0.3, default=None, phase="train"):
        from flwr_hpc.server.timing import ewma

        return ewma([getattr(t, field) for t in self._h.get(site, [])], alpha=alpha,
                    default=default)


class _FakeTransport:
    """Stands for an HPCGrid in the queue-aware strategy's view: sites and timings."""

    def __init__(self, sites, history):
        self._sites = sites
        self.timings = _Timings(history)

    def site_of(self, node_id):
        return self._sites[node_id]

    def get_node_ids(self):
        return list(self._sites)


def test_queue_aware_messages_carry_budgets_from_the_history():
    hist = {
        # fast: queue 100 s, 2 transfers of 5 s, run = 20 + 5/step; slow: queue 1000 s
        "fast": [SimpleNamespace(steps=10, run_s=70.0, queue_wait_s=100.0, transfer_s=10.0),
                 SimpleNamespace(steps=20, run_s=120.0, queue_wait_s=100.0, transfer_s=10.0)],
        "slow": [SimpleNamespace(steps=10, run_s=70.0, queue_wait_s=1000.0, transfer_s=10.0),
                 SimpleNamespace(steps=20, run_s=120.0, queue_wait_s=1000.0, transfer_s=10.0)],
    }
    grid = _FakeTransport({11: "fast", 22: "slow", 33: "new"}, hist)
    strategy = QueueAwareFedAvg(default_steps=10, max_steps=1000, min_train_nodes=3,
                                min_available_nodes=3)
    strategy._grid = grid
    nodes = strategy.select_train_nodes(1, [11, 22, 33], [11, 22, 33])
    assert sorted(nodes) == [11, 22, 33]
    # T = 1000 + 10 + 20 + 10*5 = 1080; fast: (1080 - 100 - 10 - 20)/5 = 190 steps
    assert strategy.last_target_s == pytest.approx(1080.0)
    cfg = {n: strategy.node_train_config(1, n, ConfigRecord({})) for n in nodes}
    assert cfg[11]["local-steps"] == 190
    # sqrt(10/190) = 0.229, clamped to 1/lr_scale_max = 0.25
    assert cfg[11]["lr-scale"] == pytest.approx(0.25)
    assert cfg[22]["local-steps"] == 10 and cfg[22]["lr-scale"] == 1.0
    assert cfg[33]["local-steps"] == 10 and cfg[33]["lr-scale"] == 1.0  # no history yet


# ----------------------------------------------------------------------------- merging


def _reply(value: float, n: float, *, shape=(3,)) -> Message:
    content = RecordDict({"arrays": ArrayRecord([np.full(shape, value, dtype=np.float32)]),
                          "metrics": MetricRecord({"num-examples": n, "train_loss": value})})
    msg = Message(content, dst_node_id=1, message_type="train")
    return msg


def _state(strategy, current: float, bases: dict[int, float], version: int):
    strategy.version = version
    for v, value in bases.items():
        strategy._models[v] = ArrayRecord([np.full(3, value, dtype=np.float32)])
    strategy._models[version] = ArrayRecord([np.full(3, current, dtype=np.float32)])


def test_deadline_merge_hand_computed():
    s = DeadlineFedAvg(staleness_exponent=1.0)
    _state(s, current=1.0, bases={1: 0.0}, version=2)
    updates = [(InFlight(1, 3, 2), _reply(3.0, 1)),   # fresh: delta 2, weight 1
               (InFlight(2, 2, 1), _reply(4.0, 1))]   # tau 1: delta 4, weight 0.5
    arrays, metrics = s._merge(s._models[2], updates)
    # 1 + (1*2 + 0.5*4) / (1 + 0.5) = 3.6667
    np.testing.assert_allclose(arrays.to_numpy_ndarrays()[0], np.full(3, 1 + 4 / 1.5), rtol=1e-6)
    assert metrics["updates"] == 2 and metrics["stale-updates"] == 1
    assert metrics["staleness-max"] == 1 and metrics["staleness-mean"] == 0.5


def test_fedbuff_merge_hand_computed():
    s = BufferedAsyncFedAvg(staleness_exponent=1.0, server_lr=0.5)
    _state(s, current=1.0, bases={1: 0.0}, version=2)
    updates = [(InFlight(1, 3, 2), _reply(3.0, 1)), (InFlight(2, 2, 1), _reply(4.0, 1))]
    arrays, _ = s._merge(s._models[2], updates)
    # 1 + 0.5 * (1*1*2 + 1*0.5*4) / (1 + 1) = 2.0
    np.testing.assert_allclose(arrays.to_numpy_ndarrays()[0], np.full(3, 2.0), rtol=1e-6)


def test_too_stale_and_failed_updates_are_not_merged():
    from flwr.app import Error

    s = DeadlineFedAvg(max_staleness=2)
    _state(s, current=1.0, bases={0: 0.0}, version=5)
    failed = Message(Error(code=5, reason="node gone"), reply_to=_reply(0.0, 1))
    updates = [(InFlight(1, 6, 5), _reply(2.0, 3)), (InFlight(2, 1, 0), _reply(9.0, 1)),
               (InFlight(3, 6, 5), failed)]
    arrays, metrics = s._merge(s._models[5], updates)
    np.testing.assert_allclose(arrays.to_numpy_ndarrays()[0], np.full(3, 2.0), rtol=1e-6)
    assert metrics["dropped-stale"] == 1 and metrics["failed-updates"] == 1
    assert metrics["updates"] == 1


def test_deadline_with_fresh_updates_is_fedavg():
    rng = np.random.default_rng(0)
    base = [rng.normal(size=(4, 5)).astype(np.float32), rng.normal(size=7).astype(np.float32)]
    s = DeadlineFedAvg()
    s.version = 0
    s._models[0] = ArrayRecord(base)
    replies = []
    for i in range(3):
        arrays = ArrayRecord([a + rng.normal(size=a.shape).astype(np.float32) for a in base])
        replies.append(Message(RecordDict({"arrays": arrays, "metrics": MetricRecord(
            {"num-examples": 10 * (i + 1), "train_loss": float(i)})}), 1, "train"))
    ours, _ = s._merge(s._models[0], [(InFlight(i, 1, 0), m) for i, m in enumerate(replies)])

    for i, m in enumerate(replies):
        m.metadata.__dict__["_src_node_id"] = 100 + i
    flower, _ = FedAvg().aggregate_train(1, replies)
    for a, b in zip(ours.to_numpy_ndarrays(), flower.to_numpy_ndarrays(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_strategy_config_is_validated():
    with pytest.raises(ValueError, match="quorum"):
        DeadlineFedAvg(quorum=0.0)
    with pytest.raises(ValueError, match="buffer_size"):
        BufferedAsyncFedAvg(buffer_size=0)
    with pytest.raises(ValueError, match="max_steps"):
        QueueAwareFedAvg(default_steps=10, min_steps=5, max_steps=2)


def test_job_config_refuses_central_dp_with_a_scheduled_strategy():
    from flwr_hpc.errors import ConfigError
    from strategies.job import compose_job

    with pytest.raises(ConfigError, match="dp.type"):
        compose_job(["strategy=fedbuff", "dp=central-server", "dp.noise_multiplier=0.1"])
    with pytest.raises(ConfigError, match="strategy.quorum"):
        compose_job(["strategy=deadline", "strategy.quorum=1.5"])
    job = compose_job(["strategy=queue_aware"])
    assert job["strategy"]["quorum"] == 1.0 and job["strategy"]["time_budget_s"] is None


def test_checkpoint_keeps_the_model_version_not_the_tasks_in_flight():
    """A restarted server redispatches (in-flight tasks are not in checkpoints) and keeps
    counting model versions, so staleness stays right."""
    import json

    from flwr_hpc.strategy.checkpoint import capture_state, restore_state

    s = QueueAwareFedAvg(default_steps=10, quorum=0.5, deadline_s=60.0)
    _state(s, current=1.0, bases={3: 0.0}, version=4)
    s._inflight["m1"] = InFlight(7, 4, 3)
    s._grid = object()
    arrays: dict = {}
    meta = capture_state(s, arrays)
    json.dumps(meta)  # only JSON and arrays are kept
    assert meta["version"] == {"kind": "scalar", "value": 4}
    assert meta["quorum"]["value"] == 0.5 and meta["deadline_s"]["value"] == 60.0
    assert not {"_inflight", "_models", "_grid"} & set(meta)
    fresh = QueueAwareFedAvg(default_steps=10)
    restore_state(fresh, meta, arrays)
    assert fresh.version == 4 and fresh.quorum == 0.5 and fresh._inflight == {}
