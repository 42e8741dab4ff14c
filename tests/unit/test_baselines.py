"""The APPFL baselines (FedAsync, FedQueue, FedCompass) against hand-computed budgets,
weights and aggregation sequences, on a small deterministic virtual-time grid."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from flwr_hpc.server.timing import SiteTimings, TaskTiming, VirtualClock
from strategies.buffered_async import BufferedAsyncFedAvg
from strategies.fedasync import FedAsync, fedasync_alpha
from strategies.fedcompass import FedCompass, compass_coefficient, join_steps, new_group_steps
from strategies.fedqueue import (
    FedQueue,
    admitted,
    fedqueue_budget,
    fedqueue_steps,
    fedqueue_weights,
)
from strategies.scheduled import InFlight, mix_models


@pytest.fixture(autouse=True)
def _task_identity():
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 4242, 1, 1


def _arr(value: float) -> ArrayRecord:
    return ArrayRecord([np.full(3, value, dtype=np.float32)])


def _value(arrays: ArrayRecord) -> float:
    return float(arrays.to_numpy_ndarrays()[0][0])


class VirtualGrid:
    """A deterministic grid in virtual time: node ``n``'s job queues ``queue[n]`` s, runs
    ``steps * step_s[n]`` s and returns the model it got plus ``delta[n]``."""

    def __init__(self, queue: dict[int, float], step_s: dict[int, float],
                 delta: dict[int, float]) -> None:
        self.queue, self.step_s, self.delta = queue, step_s, delta
        self.clock = VirtualClock()
        self.timings = SiteTimings()
        self._due: dict[str, tuple[float, Message, Message, TaskTiming]] = {}
        self.sent: list[tuple[float, int, int, float]] = []  # (time, node, steps, lr-scale)

    def get_node_ids(self):
        return sorted(self.queue)

    def site_of(self, node: int) -> str:
        return f"site{node}"

    def push_messages(self, messages):
        ids = []
        now = self.clock.now()
        for m in messages:
            m.metadata.__dict__["_message_id"] = m.object_id  # as Flower's grids do
            node = m.metadata.dst_node_id
            cfg = m.content.config_records["config"]
            steps = int(cfg.get("local-steps", 10))
            self.sent.append((now, node, steps, float(cfg.get("lr-scale", 1.0))))
            got = _value(m.content.array_records["arrays"])
            run = steps * self.step_s[node]
            reply = Message(RecordDict({
                "arrays": _arr(got + self.delta[node]),
                "metrics": MetricRecord({"num-examples": 1, "train_loss": 0.0})}),
                reply_to=m)
            mid = reply.metadata.reply_to_message_id
            timing = TaskTiming(site=self.site_of(node), node_id=node,
                                round=str(cfg["server-round"]), phase="train", outcome="ok",
                                submitted_at=now, turnaround_s=self.queue[node] + run,
                                queue_wait_s=self.queue[node], run_s=run, transfer_s=0.0,
                                steps=steps)
            self._due[mid] = (now + self.queue[node] + run, m, reply, timing)
            ids.append(mid)
        return ids

    def wait_any(self, ids, until=None):
        live = [(self._due[i][0], i) for i in ids if i in self._due]
        if not live:
            return []
        nxt = min(t for t, _ in live)
        if until is not None and nxt > until:
            self.clock.advance_to(until)
            return []
        self.clock.advance_to(nxt)
        return [i for t, i in sorted(live) if t <= nxt]

    def pull_messages(self, ids):
        out = []
        for i in ids:
            if i in self._due and self._due[i][0] <= self.clock.now():
                _, _, reply, timing = self._due.pop(i)
                self.timings.add(timing)
                out.append(reply)
        return out


def _drive(strategy, grid, rounds: int, start: float = 0.0):
    """Run ``rounds`` Flower rounds; return [(virtual time, global model value)]."""
    arrays = _arr(start)
    out = []
    for r in range(1, rounds + 1):
        strategy.configure_train(r, arrays, ConfigRecord({"lr": 0.1}), grid)
        new, _ = strategy.aggregate_train(r, [])
        if new is not None:
            arrays = new
        out.append((grid.clock.now(), round(_value(arrays), 6)))
    return out


# ----------------------------------------------------------------------------- pure parts


def test_mix_models_is_a_convex_step_towards_the_updates():
    out = mix_models(_arr(1.0), [(0.25, _arr(3.0)), (0.5, _arr(5.0))])
    assert _value(out) == pytest.approx(1 + 0.25 * 2 + 0.5 * 4)  # 3.5


@pytest.mark.parametrize(("staleness", "want"), [(0, 0.9), (3, 0.45), (8, 0.3)])
def test_fedasync_alpha_polynomial(staleness, want):
    assert fedasync_alpha(0.9, staleness, 0.5) == pytest.approx(want)


def test_fedqueue_budget_steps_admission_and_weights():
    assert fedqueue_budget(3600, 1000, 60) == 2540
    assert fedqueue_budget(3600, 4000, 60) == 0.5
    assert fedqueue_steps(2540, 15.0, 20) == 169   # floor(169.33)
    assert fedqueue_steps(0.5, 15.0, 20) == 20     # never under the warm-up
    assert fedqueue_steps(2540, None, 20) == 20    # no compute estimate yet
    assert fedqueue_steps(2540, 15.0, 20, max_steps=100) == 100
    assert admitted(1000, 500, 0.2, 3600)          # 1000 <= 500 + 720
    assert not admitted(1300, 500, 0.2, 3600)
    assert fedqueue_weights([0, 2], [100, 300], 0.0) == pytest.approx([0.25, 0.75])
    # (1 * 100, 1/3 * 300) -> equal
    assert fedqueue_weights([0, 2], [100, 300], 1.0) == pytest.approx([0.5, 0.5])


def test_fedcompass_group_steps_and_coefficient():
    assert join_steps(400, 310, 31.0, 2, 10) == 2          # floor(90 / 31)
    assert join_steps(400, 390, 31.0, 2, 10) is None       # under min_steps
    assert join_steps(10_000, 0, 1.0, 2, 10) is None       # over max_steps
    # a live group: latest 450, fastest member 10 s/step -> 450 + 100 = 550; (550-310)/31
    assert new_group_steps([(450.0, 10.0)], 310, 31.0, 2, 10) == 7
    assert new_group_steps([], 0, 5.0, 2, 10) == 10        # none: max_steps
    assert new_group_steps([(300.0, 1.0)], 299, 100.0, 2, 10) == 2  # 0 steps -> min
    assert compass_coefficient(0.9, 0, 0.5, 2) == pytest.approx(0.45)
    assert compass_coefficient(0.9, 3, 0.5, 2) == pytest.approx(0.225)


# ----------------------------------------------------------------------------- sequences


def test_fedqueue_admits_holds_late_updates_and_budgets_by_queue():
    grid = VirtualGrid(queue={1: 100.0, 2: 500.0}, step_s={1: 10.0, 2: 10.0},
                       delta={1: 1.0, 2: 10.0})
    s = FedQueue(t_sync=1000, theta=0, alpha_admission=0.2, q_init=0.0, warm_up_steps=10,
                 min_train_nodes=2, min_available_nodes=2, fraction_evaluate=0.0)
    out = _drive(s, grid, rounds=2)
    # round 1: node 1 in at 200 (queue 100 <= 0 + 200: admitted); node 2 in at 600
    # (queue 500 > 200: late, held over); everyone is in -> aggregate at 600 with node 1
    assert out[0] == (600.0, 1.0)
    # round 2: only node 1 is asked (node 2's update waits); q1 = 50, c1 = 10 s/step:
    # budget 1000 - 50 = 950 s -> 95 steps; lr x min budget / own: node 2 (q 250, c 10)
    # would get 75 -> 75/95; in at 600 + 100 + 950 = 1650, admitted;
    # node 2's late update (base version 0) is merged now: (95 * 2 + 10 * 10) / 105
    assert [x for x in grid.sent if x[0] == 600.0] == [(600.0, 1, 95, pytest.approx(75 / 95))]
    assert out[1] == (1650.0, pytest.approx(290 / 105, rel=1e-6))
    assert s.q_hat == {1: 75.0, 2: 250.0} and s.c_hat == {1: 10.0, 2: 10.0}
    # both are asked in round 3 with lr scaled by min budget / own budget
    s.configure_train(3, _arr(out[1][1]), ConfigRecord({}), grid)
    sent = {n: (k, lr) for t, n, k, lr in grid.sent if t == 1650.0}
    # node 1: q = 0.5*100 + 0.5*50 = 75 -> 92 steps; node 2: q = 250 -> 75 steps
    assert sent == {1: (92, pytest.approx(75 / 92)), 2: (75, 1.0)}


def test_fedqueue_timer_aggregates_without_the_slow_site():
    grid = VirtualGrid(queue={1: 10.0, 2: 5000.0}, step_s={1: 1.0, 2: 1.0},
                       delta={1: 1.0, 2: 10.0})
    s = FedQueue(t_sync=1000, theta=0, q_init=0.0, warm_up_steps=10, min_train_nodes=2,
                 min_available_nodes=2, fraction_evaluate=0.0)
    out = _drive(s, grid, rounds=1)
    assert out == [(1150.0, 1.0)]  # the timer: (1 + 0.15) * 1000; node 2 still queued


def test_fedasync_mixes_each_arrival():
    grid = VirtualGrid(queue={1: 0.0, 2: 0.0}, step_s={1: 10.0, 2: 25.0},
                       delta={1: 1.0, 2: 10.0})
    s = FedAsync(alpha=0.9, staleness_exponent=0.5, min_train_nodes=2, min_available_nodes=2,
                 fraction_evaluate=0.0)
    out = _drive(s, grid, rounds=3)
    # t=100: node 1 (base 0, tau 0): 0.9 * 1 = 0.9; re-sent on 0.9
    # t=200: node 1 (tau 0): 0.9 + 0.9 * (1.9 - 0.9) = 1.8
    # t=250: node 2 (base 0, tau 2): alpha_t = 0.9 / sqrt(3); 1.8 + a * (10 - 1.8)
    a = 0.9 / np.sqrt(3)
    assert out == [(100.0, 0.9), (200.0, pytest.approx(1.8)),
                   (250.0, pytest.approx(1.8 + a * 8.2, rel=1e-6))]


def test_fedbuff_resends_an_arrival_at_once_on_the_current_model():
    grid = VirtualGrid(queue={1: 0.0, 2: 0.0, 3: 0.0}, step_s={1: 10.0, 2: 30.0, 3: 50.0},
                       delta={1: 1.0, 2: 1.0, 3: 1.0})
    s = BufferedAsyncFedAvg(buffer_size=2, staleness_exponent=0.0, min_train_nodes=3,
                            min_available_nodes=3, fraction_evaluate=0.0)
    out = _drive(s, grid, rounds=1)
    # node 1 in at 100 (buffer 1 of 2): asked again at once, on the model of version 0;
    # node 1 again at 200 (its base still version 0) -> K = 2: 0 + (1 + 1) / 2 = 1.0
    assert [(t, n) for t, n, _, _ in grid.sent] == [(0.0, 1), (0.0, 2), (0.0, 3), (100.0, 1)]
    assert out == [(200.0, 1.0)]


def test_fedcompass_groups_nodes_by_speed():
    grid = VirtualGrid(queue={1: 0.0, 2: 0.0}, step_s={1: 10.0, 2: 31.0},
                       delta={1: 1.0, 2: 10.0})
    s = FedCompass(min_steps=2, max_steps=10, latest_time_factor=1.5, speed_momentum=1.0,
                   alpha=0.9, staleness_exponent=0.0, min_train_nodes=2,
                   min_available_nodes=2, fraction_evaluate=0.0)
    out = _drive(s, grid, rounds=5)
    assert out[0] == (100.0, pytest.approx(0.45))   # node 1's first arrival, alone
    assert out[1] == (200.0, pytest.approx(0.9))    # node 1's group (alone) complete
    assert out[2] == (300.0, pytest.approx(1.35))
    # t=310: node 2's first arrival (10 steps x 31 s; base 0, model 10): merged alone
    assert out[3] == (310.0, pytest.approx(1.35 + 0.45 * (10 - 1.35)))
    # node 2 joins node 1's group (expected 400): floor(90 / 31) = 2 steps
    assert (310.0, 2, 2, 1.0) in grid.sent
    # t=400: the group is complete: node 2 (in at 372, model 5.2425 + 10, fresh) and
    # node 1 (model 1.35 + 1, one version old) merged together
    w = 1.35 + 0.45 * (10 - 1.35)
    assert out[4] == (400.0, pytest.approx(w + 0.45 * 10 + 0.45 * (2.35 - w), rel=1e-6))


def test_scheduled_strategies_remember_what_they_hold_in_checkpoints():
    assert "_late" in FedQueue.checkpoint_transient
    assert {"_general", "_buffers", "groups"} <= set(FedCompass.checkpoint_transient)
    assert InFlight(1, 1, 0).version == 0


# ----------------------------------------------------------------------------- ours


def test_budget_async_steps_hand_values():
    from strategies.budget_async import budget_steps

    kw = {"budget_node_s": 45760.0, "exponent": 0.5, "min_steps": 5, "max_steps": 40}
    # 8 nodes, fresh: (45760 - 8 * 150) / (8 * 1) = 5570 -> the cap
    assert budget_steps(nodes=8, fixed_s=150, step_s=1.0, staleness=0, **kw) == 40
    # 128 nodes, 8 aggregations stale: (45760 / 3 - 128 * 90) / (128 * 2.5) = 11.67
    assert budget_steps(nodes=128, fixed_s=90, step_s=2.5, staleness=8, **kw) == 11
    # 512 nodes: its start-up alone costs more than the budget -> the floor
    assert budget_steps(nodes=512, fixed_s=120, step_s=3.0, staleness=0, **kw) == 5
    assert budget_steps(nodes=4, fixed_s=0, step_s=0.0, staleness=0, **kw) == 40


def test_budget_async_gives_cheap_sites_more_steps_and_merges_each_arrival():
    from types import SimpleNamespace

    from strategies.budget_async import BudgetAsync

    grid = VirtualGrid(queue={1: 0.0, 2: 0.0}, step_s={1: 1.0, 2: 1.0},
                       delta={1: 1.0, 2: 1.0})
    grid.sites = {"site1": SimpleNamespace(nodes=8), "site2": SimpleNamespace(nodes=512)}
    s = BudgetAsync(default_steps=10, staleness_exponent=0.0, min_train_nodes=2,
                    min_available_nodes=2, fraction_evaluate=0.0)
    out = _drive(s, grid, rounds=3)
    # t=10: both arrive (10 steps x 1 s) and are merged together: 0 + (1 + 1) / 2 = 1
    assert out[0] == (10.0, 1.0)
    # budgets from the history (fixed 0, 1 s/step): B = median(8 * 10, 512 * 10) = 2600
    # node-s; site1: 2600 / 8 = 325 -> the cap 40; site2: 2600 / 512 = 5.08 -> 5
    assert {(n, k) for t, n, k, _ in grid.sent if t == 10.0} == {(1, 40), (2, 5)}
    assert out[1] == (15.0, 2.0)   # site2's 5 steps in first, merged alone, asked again
    assert out[2] == (20.0, 3.0)   # ... and in again while site1 still trains its 40
    assert [(t, n, k) for t, n, k, _ in grid.sent if t == 15.0] == [(15.0, 2, 5)]


def test_a_deadline_round_with_every_task_still_queued_is_not_a_failed_round():
    from flwr_hpc.strategy.rounds import RoundsFailed, _FailedRounds, _Tally
    from strategies.deadline import DeadlineFedAvg

    grid = VirtualGrid(queue={1: 20_000.0, 2: 30_000.0}, step_s={1: 1.0, 2: 1.0},
                       delta={1: 1.0, 2: 1.0})
    s = DeadlineFedAvg(quorum=0.5, deadline_s=3600, min_train_nodes=2,
                       min_available_nodes=2, fraction_evaluate=0.0)
    guard = _FailedRounds(limit=2)
    arrays = _arr(0.0)
    for r in (1, 2, 3):  # hours of queue: three deadlines pass with nothing back
        s.configure_train(r, arrays, ConfigRecord({}), grid)
        new, _ = s.aggregate_train(r, [])
        assert new is None and s.waiting_only
        guard.round_ended(r, _Tally(), new, waiting=s.waiting_only)
    assert grid.clock.now() == 3 * 3600.0
    # the same rounds with nothing in flight (e.g. every node gone) fail the run
    with pytest.raises(RoundsFailed, match="2 round"):
        for r in (1, 2):
            guard.round_ended(r, _Tally(), None, waiting=False)
