"""`flwr-hpc bench schedulers`' statistics on hand-made runs: intervals, the target that no
one strategy sets, censoring, node-hours, the comparison with APPFL's baselines."""

from __future__ import annotations

import math

import pytest

from flwr_hpc.bench.schedulers import format_table, mean_ci, mean_curve, node_hours, tabulate


def test_mean_ci_hand_values():
    assert mean_ci([]) == {"mean": None, "ci95": None, "n": 0}
    assert mean_ci([3.0]) == {"mean": 3.0, "ci95": None, "n": 1}
    # mean 2, sd 1, n 3: t(0.975, 2) = 4.303 -> 4.303 / sqrt(3)
    got = mean_ci([1.0, 2.0, 3.0])
    assert got["mean"] == 2.0 and got["ci95"] == pytest.approx(4.303 / math.sqrt(3))


def test_node_hours_sum_the_tasks_charges():
    from flwr_hpc.server.telemetry import allocation_summary

    tasks = [{"node_hours": 1.5}, {"node_hours": None}, {"node_hours": 0.25}, {}]
    assert node_hours(tasks) == 1.75
    records = [{"site": "mira", "node_hours": 10.0}, {"site": "theta", "node_hours": 2.5},
               {"site": "mira", "node_hours": None}]
    assert allocation_summary(records) == "12.5 node-hours (mira 10, theta 2.5)"


def _run(curve, nh=10.0, aggs=None):
    aggs = len(curve) - 1 if aggs is None else aggs
    return {"curve": curve, "final_eval_loss": curve[-1][1], "node_hours": nh,
            "node_hours_per_aggregation": nh / aggs if aggs else None, "aggregations": aggs,
            "mean_utilisation": 0.5, "mean_compute_share": 0.1}


def test_tabulate_target_censoring_and_the_comparison():
    h = 3600.0
    runs = {
        "fedavg": {0: _run([(0, 6.0), (10 * h, 5.5), (20 * h, 5.0)]),
                   1: _run([(0, 6.0), (12 * h, 5.6), (24 * h, 5.2)])},
        "fedqueue": {0: _run([(0, 6.0), (5 * h, 5.2), (24 * h, 5.0)], nh=20.0),
                     1: _run([(0, 6.0), (24 * h, 5.3)], nh=20.0)},  # never reaches 5.2
        "deadline": {0: _run([(0, 6.0), (2 * h, 5.1)], nh=22.0),
                     1: _run([(0, 6.0), (3 * h, 5.2)], nh=22.0)},
    }
    result = tabulate(runs, strategies=("fedavg", "fedqueue", "deadline"), federation="x",
                      seeds=(0, 1), hours=24.0, local_steps=10, sites=["a"])
    # the worst final loss of FedAvg over the seeds: every FedAvg run reaches it
    assert result["target_eval_loss"] == 5.2
    t = result["table"]
    assert t["fedavg"]["time_to_target_s"]["mean"] == pytest.approx(22 * h)  # (20 + 24) / 2
    assert t["fedqueue"]["reached"] == 1  # seed 1 never does: counted as the 24 h budget
    assert t["fedqueue"]["time_to_target_s"]["mean"] == pytest.approx((5 + 24) / 2 * h)
    assert t["deadline"]["time_to_target_s"]["mean"] == pytest.approx(2.5 * h)
    assert result["best"] == "deadline"
    v = result["versus"]["fedqueue"]
    assert v["time_saved"] == pytest.approx(1 - 2.5 / 14.5)
    assert v["final_loss_vs"] == pytest.approx(5.15 / 5.15 - 1)
    assert v["node_hours_vs"] == pytest.approx(22 / 20 - 1)
    table = format_table(result)
    assert "| FedQueue | ≥ 14.5 ± " in table and "| 1/2 |" in table
    assert "Deadline vs FedQueue: +83% time to target saved" in table


def test_mean_curve_is_a_step_function_averaged_over_runs():
    a = [(0.0, 4.0), (10.0, 2.0)]
    b = [(0.0, 6.0), (5.0, 4.0)]
    assert mean_curve([a, b], [0.0, 5.0, 10.0]) == [5.0, 4.0, 3.0]


def test_a_failed_run_is_reported_and_counts_as_never_reaching_the_target():
    h = 3600.0
    runs = {"fedavg": {0: _run([(0, 6.0), (10 * h, 5.0)]), 1: _run([(0, 6.0), (9 * h, 5.0)])},
            "deadline": {0: _run([(0, 6.0), (1 * h, 4.9)]),
                         1: {"strategy": "deadline", "failed": "run x ended finished:failed"}}}
    result = tabulate(runs, strategies=("fedavg", "deadline"), federation="x", seeds=(0, 1),
                      hours=24.0, local_steps=10, sites=["a"])
    t = result["table"]["deadline"]
    assert t["failed"] == 1 and t["reached"] == 1
    assert t["time_to_target_s"]["mean"] == pytest.approx((1 + 24) / 2 * h)
    assert t["final_eval_loss"]["mean"] == 4.9  # from the run that finished
    assert "| 1/2 (1 failed) |" in format_table(result)


def test_a_target_from_the_baselines_rounds_and_retabulating_a_saved_result():
    import json

    from flwr_hpc.bench.schedulers import retabulate

    h = 3600.0
    runs = {"fedavg": {0: _run([(0, 6.0), (10 * h, 5.5), (20 * h, 5.0)]),
                       1: _run([(0, 6.0), (12 * h, 5.6), (24 * h, 5.2)]),
                       2: _run([(0, 6.0)], aggs=0)},  # never got a round done
            "deadline": {s: _run([(0, 6.0), (1 * h, 5.55), (2 * h, 5.4)]) for s in (0, 1, 2)}}
    result = tabulate(runs, strategies=("fedavg", "deadline"), federation="x",
                      seeds=(0, 1, 2), hours=24.0, local_steps=10, sites=["a"],
                      target_round=1)
    assert result["target_eval_loss"] == 5.6
    assert "after 1 rounds, over the 2 seeds" in result["target_rule"]
    assert result["table"]["deadline"]["time_to_target_s"]["mean"] == pytest.approx(1 * h)
    again = retabulate(json.loads(json.dumps(result)), target_loss=5.45)
    assert again["target_eval_loss"] == 5.45
    assert again["table"]["deadline"]["time_to_target_s"]["mean"] == pytest.approx(2 * h)
    assert again["table"]["fedavg"]["reached"] == 2
