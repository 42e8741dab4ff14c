"""`flwr-hpc bench schedulers` on simulated facilities: seeds, intervals, node-hours, and the
same seed gives the same run (moved out of test_scheduler_runs.py so the two files run in
parallel)."""

from __future__ import annotations

import json

import pytest


@pytest.fixture
def bench_args(tmp_path):
    return ["bench", "schedulers", "--hours", "3", "--strategies", "fedavg,fedbuff",
            "--local-steps", "3", "--seeds", "7,8", "--jobs", "2", "--json",
            "--out", str(tmp_path / "out"), "--workdir", str(tmp_path / "work")]


@pytest.mark.slow(90)
def test_bench_schedulers_over_seeds_is_reproducible(bench_args, tmp_path, capsys):
    from flwr_hpc.bench.schedulers import _one, app_dir, mean_ci
    from flwr_hpc.control.cli import main
    from flwr_hpc.fab import build_fab

    assert main(bench_args) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["baseline"] == "fedavg" and printed["seeds"] == [7, 8]
    runs = printed["runs"]
    assert set(runs) == {"fedavg", "fedbuff"} and set(runs["fedbuff"]) == {"7", "8"}
    # the target is the worst FedAvg final loss over the seeds: FedAvg reaches it always
    finals = [runs["fedavg"][s]["final_eval_loss"] for s in ("7", "8")]
    assert printed["target_eval_loss"] == max(finals)
    assert printed["table"]["fedavg"]["reached"] == 2
    for name in ("fedavg", "fedbuff"):
        row = printed["table"][name]
        assert row["final_eval_loss"] == pytest.approx(
            mean_ci([runs[name][s]["final_eval_loss"] for s in ("7", "8")]))
        for seed in ("7", "8"):
            r = runs[name][seed]
            # node-hours: every site charged for the time its jobs ran (1 node each here)
            assert r["node_hours"] > 0
            assert sum(r["node_hours_by_site"].values()) == pytest.approx(r["node_hours"],
                                                                         abs=1e-5)
            assert set(r["utilisation"]) == {"polaris", "perlmutter", "frontier", "aurora"}
            assert all(0 <= u <= 1 for u in r["utilisation"].values())
    fed = runs["fedbuff"]["7"]
    assert fed["aggregations"] >= 2 and fed["train_tasks"] >= fed["aggregations"]
    out = tmp_path / "out"
    saved = json.loads((out / "schedulers.json").read_text())
    for name in ("fedavg", "fedbuff"):  # time_budget_s: the round crossing 3 h is the last
        curve = saved["runs"][name]["7"]["curve"]
        assert curve[-2][0] < 3 * 3600 <= curve[-1][0], (name, curve[-2:])
    table = (out / "schedulers.md").read_text()
    assert "| FedBuff |" in table and "<svg" in (out / "schedulers.svg").read_text()

    # the same seed, run again on its own: the same curve and the same charges
    again = _one({"fab": build_fab(app_dir()), "strategy": "fedbuff", "seed": 7,
                  "federation": "sim_4facilities", "hours": 3.0, "local_steps": 3,
                  "max_rounds": 400, "home": str(tmp_path / "again")})
    assert [list(p) for p in again["curve"]] == saved["runs"]["fedbuff"]["7"]["curve"]
    assert again["node_hours"] == saved["runs"]["fedbuff"]["7"]["node_hours"]
