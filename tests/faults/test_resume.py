"""Checkpoint/resume: a killed runner resumes and ends where an uninterrupted run ends."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import psutil
import pytest
from helpers import read_tasks

# FedAdam (server moments) under central DP (server-side NumPy noise): what a resumed run
# must restore exactly -- moments, noise RNG, node sampling RNG, node Contexts.
JOB = ("strategy=fedadam strategy.num_rounds=4 dp=central-server dp.noise_multiplier=0.1 "
       "dp.clipping_norm=5.0 dp.noise_seed=7 train.local_steps=3 evaluate.central=false "
       "evaluate.max_generate=0")
FED = ["federation.sites.beta.clients=1", "federation.sites.beta.compute.workers=1",
       "~federation.sites.gamma"]


def _adapter(run_dir: Path, rnd: int) -> dict:
    from safetensors.numpy import load_file

    (path,) = (run_dir / "global" / f"round-{rnd}").glob("*.safetensors")
    return load_file(path)


def _kill_runner(run_dir: Path, patch: str, env: dict) -> int:
    """Run the runner in its own process group with ``patch`` applied; return its exit code
    (it SIGKILLs itself at the patched point) after killing whatever it left behind."""
    code = textwrap.dedent(f"""
        import os, signal, sys
        {textwrap.indent(textwrap.dedent(patch), "        ").strip()}
        from flwr_hpc.server.runner import main
        sys.exit(main([{str(run_dir)!r}]))
    """)
    out = run_dir / "killed-runner.out"
    with open(out, "wb") as fh:  # not a pipe: orphans would hold it open
        proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=fh,
                                stderr=subprocess.STDOUT, start_new_session=True)
        proc.wait(timeout=600)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # site workers die with the runner
        left = [p for p in psutil.process_iter(["pid"]) if _pgid(p.pid) == proc.pid]
        if not left:
            break
        time.sleep(0.2)
    for p in left:
        p.kill()
    assert proc.returncode == -signal.SIGKILL, out.read_text()[-3000:]
    assert left == [], "the killed runner left site workers running"
    return 0


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, lora_fab):
    from flwr_hpc.config import load_federation
    from flwr_hpc.server.runner import execute_run
    from flwr_hpc.server.runs import prepare_run

    home = tmp_path_factory.mktemp("home-ref")
    old = os.environ.get("FLWR_HOME")
    os.environ["FLWR_HOME"] = str(home)
    try:
        run_dir = prepare_run(lora_fab, {"overrides": JOB}, load_federation(FED), home=home)
        assert execute_run(run_dir) == "finished:completed"
    finally:
        if old is None:
            os.environ.pop("FLWR_HOME", None)
        else:
            os.environ["FLWR_HOME"] = old
    return run_dir


def _interrupted_run(flwr_home, lora_fab, patch: str) -> Path:
    from flwr_hpc.config import load_federation
    from flwr_hpc.server.runner import execute_run
    from flwr_hpc.server.runs import prepare_run, read_status

    run_dir = prepare_run(lora_fab, {"overrides": JOB}, load_federation(FED))
    env = {**os.environ, "FLWR_HOME": str(flwr_home)}
    _kill_runner(run_dir, patch, env)
    assert read_status(run_dir)["status"] == "running"  # died without finishing
    assert execute_run(run_dir) == "finished:completed"  # what `flwr-hpc resume` runs
    return run_dir


def _assert_same_final_model(run_dir: Path, reference: Path) -> None:
    import numpy as np

    got, want = _adapter(run_dir, 4), _adapter(reference, 4)
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_allclose(got[k], want[k], atol=1e-6, rtol=0)
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows if r["round"] > 0] == [1, 2, 3, 4]


@pytest.mark.slow(70)
def test_runner_killed_after_round_2_resumes_to_the_same_final_model(
        uninterrupted, flwr_home, lora_fab):
    patch = """
        import flwr_hpc.strategy.checkpoint as c
        _write = c.write_checkpoint
        def write_checkpoint(root, ckpt):
            path = _write(root, ckpt)
            if ckpt.round == 2:
                os.kill(os.getpid(), signal.SIGKILL)
            return path
        c.write_checkpoint = write_checkpoint
    """
    run_dir = _interrupted_run(flwr_home, lora_fab, patch)
    _assert_same_final_model(run_dir, uninterrupted)
    trained = Counter((t["node_id"], t["round"]) for t in read_tasks(run_dir)
                      if t["phase"] == "train" and t["outcome"] == "ok")
    assert set(trained.values()) == {1} and len(trained) == 4 * 2  # no round trained twice
    log = (run_dir / "log.txt").read_text()
    assert "resumes after round 2" in log


@pytest.mark.slow(40)
def test_runner_killed_mid_round_repeats_only_the_unfinished_round(
        uninterrupted, flwr_home, lora_fab):
    patch = """
        import flwr_hpc.server.grid as g
        _collect = g.HPCGrid._collect
        def _collect_then_die(self, task, *args):
            reply = _collect(self, task, *args)
            if task.round == "3" and task.phase == "train":
                os.kill(os.getpid(), signal.SIGKILL)  # one reply of round 3 is in
            return reply
        g.HPCGrid._collect = _collect_then_die
    """
    run_dir = _interrupted_run(flwr_home, lora_fab, patch)
    _assert_same_final_model(run_dir, uninterrupted)
    trained = Counter((t["node_id"], t["round"]) for t in read_tasks(run_dir)
                      if t["phase"] == "train" and t["outcome"] == "ok")
    assert {r: max(n for (_, rr), n in trained.items() if rr == r)
            for r in ("1", "2", "4")} == {"1": 1, "2": 1, "4": 1}
    assert max(n for (_, r), n in trained.items() if r == "3") == 2  # round 3 repeated


@pytest.mark.slow(40)
def test_runner_killed_between_the_metrics_row_and_the_checkpoint_writes_no_row_twice(
        uninterrupted, flwr_home, lora_fab):
    """Round 2's row is in metrics.jsonl, its checkpoint is not: resume redoes round 2 and
    its row replaces the one written before the kill ([0,1,2,3,4], not [0,1,2,2,3,4])."""
    patch = """
        import flwr_hpc.strategy.checkpoint as c
        _write = c.write_checkpoint
        def write_checkpoint(root, ckpt):
            if ckpt.round == 2:
                os.kill(os.getpid(), signal.SIGKILL)
            return _write(root, ckpt)
        c.write_checkpoint = write_checkpoint
    """
    run_dir = _interrupted_run(flwr_home, lora_fab, patch)
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2, 3, 4]
    _assert_same_final_model(run_dir, uninterrupted)
    assert "resumes after round 1" in (run_dir / "log.txt").read_text()
