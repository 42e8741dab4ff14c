"""The LoRA job with two-rank clients: DDP under torchrun and mpirun, with and without
Opacus DP-SGD (moved out of test_lora_job.py so the two files run in parallel)."""

from __future__ import annotations

import os
import shutil

import pytest
from helpers import read_tasks

from flwr_hpc.config import load_federation


def _require_launchers() -> None:
    missing = [exe for exe in ("mpirun",) if shutil.which(exe) is None]
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"{missing} not installed; scripts/setup.sh installs Open MPI")
        pytest.skip(f"{missing} not installed (scripts/setup.sh installs Open MPI)")


@pytest.mark.slow(40)
@pytest.mark.parametrize("dp", ["none", "opacus"])
def test_two_rank_clients_under_torchrun_and_mpirun(run_lora_job, dp):
    """Plain DDP, and DP-SGD over DP-DDP (Opacus' distributed optimizer)."""
    _require_launchers()
    fed = load_federation(["federation=local_ranks"])
    status, run_dir, rows = run_lora_job(
        f"dp={dp} strategy.num_rounds=1 train.local_steps=6 evaluate.federated=false "
        "evaluate.central=false", federation=fed)
    assert status == "finished:completed", (run_dir / "log.txt").read_text()[-3000:]
    train = [t for t in read_tasks(run_dir) if t["phase"] == "train"]
    assert sorted(t["launcher"] for t in train) == ["openmpi", "torchrun"]
    assert all(t["ranks"] == 2 and t["outcome"] == "ok" for t in train)
    metrics = rows[-1]["train_metrics"]
    assert metrics["world-size"] == 2
    assert metrics["replica-max-abs-diff"] == 0.0  # identical replicas on both ranks
    assert rows[-1]["train_replies"] == 2
    if dp == "opacus":
        assert 0 < rows[-1]["epsilon"] < float("inf")
