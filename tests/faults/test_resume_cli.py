"""`flwr-hpc resume`, a restarted HPC SuperLink resuming interrupted runs, and the bind rule."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from helpers import read_tasks

BIN = Path(sys.executable).parent


def _cli(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / args[0]), *args[1:]], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _interrupted(quickstart_fab, **status) -> Path:
    """A run whose runner died: its status still says running (or failed by the reaper)."""
    from flwr_hpc.config import load_federation
    from flwr_hpc.server.runs import prepare_run, update_status

    run_dir = prepare_run(quickstart_fab, {"num-server-rounds": 2}, load_federation())
    update_status(run_dir, **{"status": "running", "pid": _dead_pid(), **status})
    return run_dir


def test_resume_refuses_unknown_and_completed_runs(flwr_home, run_quickstart):
    res = _cli("flwr-hpc", "resume", "12345")
    assert res.returncode == 2 and "no run 12345" in res.stderr
    status, run_dir, _ = run_quickstart({"num-server-rounds": 1})
    assert status == "finished:completed"
    res = _cli("flwr-hpc", "resume", run_dir.name)
    assert res.returncode == 1 and "already completed; nothing to resume" in res.stderr


def test_resume_in_the_foreground_finishes_a_failed_run(flwr_home, quickstart_fab):
    from flwr_hpc.server.runs import read_status

    run_dir = _interrupted(quickstart_fab, status="finished", sub_status="failed",
                           details="runner exited with code -9")
    res = _cli("flwr-hpc", "resume", run_dir.name, "--foreground")
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"run {run_dir.name}: resuming after round 0" in res.stdout
    assert read_status(run_dir)["sub_status"] == "completed"
    assert {t["round"] for t in read_tasks(run_dir)} == {"1", "2"}


def test_a_restarted_superlink_resumes_the_runs_it_lost(flwr_home, quickstart_fab):
    from flwr_hpc.server.runs import read_status

    run_dir = _interrupted(quickstart_fab)  # the SuperLink and its runner died mid-run
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    up = _cli("flwr-hpc", "up", "--port", str(port))
    assert up.returncode == 0, up.stderr
    try:
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline and read_status(run_dir)["status"] != "finished":
            time.sleep(0.5)
        status = read_status(run_dir)
        assert (status["status"], status["sub_status"]) == ("finished", "completed"), status
        log = (flwr_home / "hpc" / "superlink.log").read_text()
        assert f"resumed run {run_dir.name} after round 0" in log
    finally:
        _cli("flwr-hpc", "down")


def test_a_non_loopback_bind_is_refused_with_the_reason(flwr_home):
    res = _cli("flwr-hpc", "up", "--host", "0.0.0.0", "--port", "39999")
    assert res.returncode == 2
    assert "refusing to bind 0.0.0.0" in res.stderr and "TLS" in res.stderr
    assert "token" in res.stderr and "SSH tunnel" in res.stderr
    assert not (flwr_home / "hpc" / "superlink.json").exists()
