"""Scheduler-aware strategies end to end: `flwr run . hpc` on the local federation, and
`flwr-hpc bench schedulers` on simulated facilities (same seed, same table)."""

from __future__ import annotations

import json
import math

import pytest
from helpers import cli as _cli


def _job(strategy: str) -> str:
    # FedQueue and FedCompass size local work from the measured seconds per step: capped
    # so that a local run's hour-long t_sync does not turn into thousands of steps.
    # server.site: the central evaluation runs at site alpha (whose workers have the model
    # libraries loaded already), so the seven runners never import torch/transformers/peft
    # themselves (about 6 CPU-s each); it also runs the lean server under every strategy.
    cap = " strategy.max_steps=6" if strategy in ("fedqueue", "fedcompass") else ""
    return (f'overrides="strategy={strategy} strategy.num_rounds=2 train.local_steps=3 '
            f'evaluate.max_generate=0 server.site=alpha{cap}"')


@pytest.mark.slow(200)
def test_each_scheduler_aware_strategy_runs_through_flwr_run(superlink, flwr_home, lora_app):
    for strategy in ("deadline", "fedbuff", "queue_aware", "fedasync", "fedqueue",
                     "fedcompass", "budget_async"):
        run = _cli("flwr", "run", ".", "hpc", "--stream", "-c", _job(strategy), cwd=lora_app,
                   timeout=600)
        assert run.returncode == 0, run.stderr[-3000:]
        run_id = int(run.stdout.split("Successfully started run ")[1].split()[0])
        run_dir = flwr_home / "hpc" / "runs" / str(run_id)
        status = json.loads((run_dir / "status.json").read_text())
        assert (status["status"], status["sub_status"]) == ("finished", "completed"), strategy
        rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert [r["round"] for r in rows] == [0, 1, 2], strategy
        assert all(r["train_replies"] >= 1 for r in rows[1:]), (strategy, rows)
        assert all(math.isfinite(r["eval_loss"]) for r in rows)
        assert rows[2]["eval_loss"] < rows[0]["eval_loss"], strategy
        tasks = [json.loads(x) for x in (run_dir / "tasks.jsonl").read_text().splitlines()]
        train = [t for t in tasks if t["phase"] == "train"]
        assert len(train) >= 4 and all(t["clock"] == "server" for t in tasks)
        assert all(t["queue_wait_s"] is not None and t["queue_wait_s"] >= 0
                   for t in train if t["outcome"] == "ok")
        job = json.loads((run_dir / "job.json").read_text())
        assert job["strategy"]["name"] == strategy
        if strategy == "queue_aware":
            # every train message carried its budget; round 2's came from round 1's timings
            assert all(1 <= t["steps"] <= 12 for t in train), [t["steps"] for t in train]
            log = (run_dir / "log.txt").read_text()
            assert "queue-aware budgets for a" in log
        if strategy == "deadline":
            # quorum 0.5: round 1 closed when 2 of the 4 asked had answered
            assert rows[1]["train_metrics"]["updates"] >= 2
        if strategy == "fedasync":  # one arrival per aggregation (more when simultaneous)
            assert all(1 <= r["train_metrics"]["updates"] <= 4 for r in rows[1:])
        if strategy == "fedqueue":
            # round 1 at the warm-up (train.local_steps); then budgets from the timings,
            # capped; every node answered before the hour-long t_sync: all were merged
            assert sorted({t["steps"] for t in train if t["round"] == "1"}) == [3]
            assert all(3 <= t["steps"] <= 6 for t in train)
            assert rows[1]["train_metrics"]["updates"] == 4
        if strategy == "budget_async":  # budgets within [default // 2, 4 x default]
            assert all(1 <= t["steps"] <= 12 for t in train), [t["steps"] for t in train]
            assert "budget-async:" in (run_dir / "log.txt").read_text()
        if strategy == "fedcompass":
            # everyone starts with max_steps; round 1 is the first arrival, merged alone
            assert {t["steps"] for t in train if t["round"] == "1"} == {6}
            assert rows[1]["train_metrics"]["updates"] == 1
