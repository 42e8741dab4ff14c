"""`flwr-hpc bench schedulers` on simulated facilities: same seed, same table (moved out
of test_scheduler_runs.py so the two files run in parallel)."""

from __future__ import annotations

import json

import pytest


@pytest.fixture
def bench_args(tmp_path):
    return ["bench", "schedulers", "--hours", "3", "--strategies", "fedavg,fedbuff",
            "--local-steps", "3", "--seed", "7", "--json", "--out", str(tmp_path / "out")]


@pytest.mark.slow(80)
def test_bench_schedulers_is_reproducible(bench_args, tmp_path, capsys):
    from flwr_hpc.bench.schedulers import bench_schedulers, format_table
    from flwr_hpc.control.cli import main

    assert main(bench_args) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(printed["time_to_target_s"]) == {"fedavg", "fedbuff"}
    assert printed["baseline"] == "fedavg" and printed["seed"] == 7
    # the target is FedAvg's final loss: FedAvg reaches it (at its end) by definition
    assert printed["time_to_target_s"]["fedavg"] is not None
    fed = printed["strategies"]["fedbuff"]
    assert fed["aggregations"] >= 2 and fed["train_tasks"] >= fed["aggregations"]
    assert set(fed["utilisation"]) == {"polaris", "perlmutter", "frontier", "aurora"}
    assert all(0 <= u <= 1 for u in fed["utilisation"].values())
    out = tmp_path / "out"
    saved = json.loads((out / "schedulers.json").read_text())
    table = (out / "schedulers.md").read_text()
    for name in ("fedavg", "fedbuff"):  # time_budget_s: the round crossing 3 h is the last
        curve = saved["strategies"][name]["curve"]
        assert curve[-2][0] < 3 * 3600 <= curve[-1][0], (name, curve[-2:])
    assert "| Buffered async |" in table and "<svg" in (out / "schedulers.svg").read_text()

    again = bench_schedulers(("fedavg", "fedbuff"), hours=3, local_steps=3, seed=7,
                             progress=lambda _: None)
    assert format_table(again) == table  # same seed, same table
    assert again["final_eval_loss"] == saved["final_eval_loss"]
    curve = [list(point) for point in again["strategies"]["fedbuff"]["curve"]]
    assert curve == saved["strategies"]["fedbuff"]["curve"]
