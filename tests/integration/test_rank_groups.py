"""Persistent rank groups (#20, item 1): a launched client's rank group is started once per
run and fed later tasks warm; a rank killed mid-run is detected and the run goes on; no
rank outlives the run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time

import psutil
import pytest
from helpers import read_tasks

from flwr_hpc.config import load_federation


def _require_mpirun() -> None:
    if shutil.which("mpirun") is None:
        if os.environ.get("CI"):
            pytest.fail("mpirun not installed; scripts/setup.sh installs Open MPI")
        pytest.skip("mpirun not installed (scripts/setup.sh installs Open MPI)")


def _serving_ranks(home) -> list[psutil.Process]:
    """Rank processes of persistent groups under this test's FLWR_HOME."""
    out = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info["cmdline"] or []
        if "--serve" in cmd and any(str(home) in c for c in cmd):
            out.append(p)
    return out


@pytest.mark.slow(45)
def test_groups_launch_once_and_later_rounds_pay_no_launch(run_lora_job, flwr_home):
    _require_mpirun()
    steps = 4
    status, run_dir, rows = run_lora_job(
        f"strategy.num_rounds=3 train.local_steps={steps} evaluate.federated=false "
        "evaluate.central=false", federation=load_federation(["federation=local_ranks"]))
    assert status == "finished:completed", (run_dir / "log.txt").read_text()[-3000:]
    train = [t for t in read_tasks(run_dir) if t["phase"] == "train"]
    assert len(train) == 6 and {t["outcome"] for t in train} == {"ok"}
    for site in ("torch", "mpi"):
        mine = sorted((t for t in train if t["site"] == site), key=lambda t: int(t["round"]))
        # one group per site for the whole run: rank 0 is the same process every round
        assert len({t["worker_pid"] for t in mine}) == 1, mine
        assert mine[0]["load_s"] > 0.5  # round 1 imported and loaded the ClientApp
        for t in mine[1:]:
            assert t["load_s"] < 0.05, t  # warm: already loaded
            row = next(r for r in rows if r["round"] == int(t["round"]))
            train_s = steps * row["train_metrics"]["step_time_s"]
            overhead = t["run_s"] - train_s
            assert overhead <= 1.5, (site, t["round"], t["run_s"], train_s)
    for r in rows[1:]:
        assert r["train_metrics"]["replica-max-abs-diff"] == 0.0  # replicas stay identical
        assert r["train_metrics"]["world-size"] == 2
    assert _serving_ranks(flwr_home) == []  # every rank ended with the run


@pytest.mark.slow(60)
def test_a_rank_killed_mid_run_is_detected_and_the_run_goes_on(run_lora_job, flwr_home):
    _require_mpirun()
    killed: list[int] = []

    def kill_a_torch_rank_after_round_1() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not killed:
            for run_dir in (flwr_home / "hpc" / "runs").glob("*"):
                metrics = run_dir / "metrics.jsonl"
                if metrics.exists() and '"round": 1' in metrics.read_text():
                    for p in _serving_ranks(flwr_home):
                        cmd = " ".join(p.info["cmdline"])
                        # a rank of the torch site's group (not torchrun's agent)
                        if "/torch/launch/" in cmd and "torch.distributed.run" not in cmd:
                            p.send_signal(signal.SIGKILL)
                            killed.append(p.pid)
                            return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_a_torch_rank_after_round_1, daemon=True)
    killer.start()
    status, run_dir, rows = run_lora_job(
        "strategy.num_rounds=4 train.local_steps=6 evaluate.federated=false "
        "evaluate.central=false strategy.min_train_nodes=1 strategy.min_available_nodes=1",
        federation=load_federation(["federation=local_ranks"]))
    killer.join(timeout=5)
    assert killed, "no rank was killed"
    assert status == "finished:completed", (run_dir / "log.txt").read_text()[-3000:]
    assert [r["round"] for r in rows] == [0, 1, 2, 3, 4]
    torch_tasks = sorted((t for t in read_tasks(run_dir)
                          if t["phase"] == "train" and t["site"] == "torch"),
                         key=lambda t: int(t["round"]))
    pids = [t["worker_pid"] for t in torch_tasks if t["outcome"] == "ok"]
    assert len(set(pids)) == 2, torch_tasks  # a new group after the kill
    hit = [t for t in torch_tasks if t["outcome"] != "ok"]
    # killed while idle: the next task relaunched the group and ran (no failure); killed
    # while a task ran: that task is a crashed ClientApp, and the next one runs again
    assert len(hit) <= 1, torch_tasks
    for t in hit:
        assert "rank group of 2 ranks exited" in t["error"], t
    assert torch_tasks[-1]["outcome"] == "ok"
    deadline = time.monotonic() + 10
    while _serving_ranks(flwr_home) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _serving_ranks(flwr_home) == []
    json.dumps(rows)  # the records stay plain JSON
