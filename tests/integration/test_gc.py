"""`flwr-hpc gc` (#20, item 5): frees the bytes it reports, never what a live run uses,
and a run resumed after gc still completes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers import cli as _cli

from flwr_hpc.config import load_federation
from flwr_hpc.control.gc import collect, store_dirs


def _files(root: Path) -> dict[Path, int]:
    return {p: p.stat().st_size for p in root.rglob("*") if p.is_file()}


def _store_objects(home: Path) -> dict[Path, int]:
    out: dict[Path, int] = {}
    for root in store_dirs(home)[0].values():
        if (root / "objects").is_dir():
            out.update(_files(root / "objects"))
    return out


def _wait_for_round(run_dir: Path, tasks: int, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        path = run_dir / "tasks.jsonl"
        if path.exists() and path.read_text().count("\n") >= tasks:
            return
        time.sleep(0.1)
    raise AssertionError(f"{run_dir.name}: fewer than {tasks} tasks after {timeout} s")


def test_gc_frees_what_it_reports_and_only_with_keep_runs_touches_runs(run_quickstart,
                                                                        flwr_home):
    for _ in range(2):
        status, _, _ = run_quickstart({"num-server-rounds": 2})
        assert status == "finished:completed"
    before = _store_objects(flwr_home)
    assert len(before) > 10
    runs = sorted(p.name for p in (flwr_home / "hpc" / "runs").iterdir())

    # young objects are kept (min age), then a dry run reports and removes nothing
    assert collect(flwr_home).bytes == 0
    dry = collect(flwr_home, dry_run=True, min_age_s=0, keep_runs=1)
    assert _store_objects(flwr_home) == before
    assert sorted(p.name for p in (flwr_home / "hpc" / "runs").iterdir()) == runs

    report = collect(flwr_home, min_age_s=0)
    assert report.removed and not report.runs_removed
    assert report.bytes == sum(before.values())  # exactly the bytes that are gone
    assert _store_objects(flwr_home) == {}
    assert dry.bytes >= report.bytes  # the dry run also counted a run directory
    assert len(dry.runs_removed) == 1

    run_dir = flwr_home / "hpc" / "runs" / dry.runs_removed[0]
    size = sum(_files(run_dir).values())
    kept = collect(flwr_home, min_age_s=0, keep_runs=1)
    assert kept.runs_removed == dry.runs_removed and kept.bytes == size
    assert not run_dir.exists()
    assert len(list((flwr_home / "hpc" / "runs").iterdir())) == 1

    out = _cli("flwr-hpc", "gc", "--dry-run", "--min-age-s", "0")
    assert out.returncode == 0 and "gc would free 0.0 MiB" in out.stdout, out.stdout


def test_gc_during_a_run_keeps_what_it_uses(run_quickstart, flwr_home):
    status, old_run, _ = run_quickstart({"num-server-rounds": 1})
    assert status == "finished:completed"
    old = _store_objects(flwr_home)
    time.sleep(1.1)  # mtimes: the old run's objects are now older than the live run
    results: dict[str, object] = {}

    def live() -> None:
        results["status"], results["run_dir"], _ = run_quickstart(
            {"num-server-rounds": 3, "sleep-partition": 0, "sleep-s": 1.0})

    thread = threading.Thread(target=live)
    thread.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(list((flwr_home / "hpc" / "runs").iterdir())) < 2:
        time.sleep(0.05)
    new_dir = next(p for p in (flwr_home / "hpc" / "runs").iterdir() if p != old_run)
    _wait_for_round(new_dir, 4)  # round 1 of 3 done; rounds 2 and 3 to come
    report = collect(flwr_home, min_age_s=0, list_files=True)
    thread.join(timeout=120)
    assert report.live_runs == [new_dir.name]
    assert results["status"] == "finished:completed"
    # only the old run's objects went, none the live run had used (it refreshed those);
    # one it needs again later it simply stages again
    assert report.files and set(report.files) <= set(old)
    assert report.bytes == sum(old[p] for p in report.files)


@pytest.mark.slow(50)
def test_a_run_resumed_after_gc_completes(lora_fab, flwr_home):
    """The LoRA job checkpoints every round: killed after one, collected, resumed."""
    from flwr_hpc.server.runner import execute_run
    from flwr_hpc.server.runs import checkpoint_round, prepare_run, read_status

    fed = load_federation([])
    run_dir = prepare_run(lora_fab, {"overrides": "strategy.num_rounds=3 train.local_steps=15 "
                                                  "evaluate.federated=false "
                                                  "evaluate.max_generate=0"}, fed)
    runner = subprocess.Popen([sys.executable, "-m", "flwr_hpc.server.runner", str(run_dir)],
                              env={**os.environ, "FLWR_HOME": str(flwr_home)},
                              start_new_session=True, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 90
        while checkpoint_round(run_dir) < 1 and time.monotonic() < deadline:
            time.sleep(0.1)  # a round checkpointed, more to come
    finally:
        os.killpg(runner.pid, signal.SIGKILL)  # the runner and its site workers
        runner.wait()
    done = checkpoint_round(run_dir)
    assert 1 <= done < 3
    report = collect(flwr_home, min_age_s=0)
    assert report.bytes > 0 and report.live_runs == []  # a dead runner is not live
    assert _store_objects(flwr_home) == {}

    status = execute_run(run_dir)  # what `flwr-hpc resume --foreground` runs
    assert status == "finished:completed", (run_dir / "log.txt").read_text()[-3000:]
    assert read_status(run_dir)["sub_status"] == "completed"
    assert checkpoint_round(run_dir) == 3
