"""One runner per run, across service crashes, restarts and concurrent `up`s (issue #16,
item 4). The runner holds ``<run dir>/runner.lock``; a new service adopts a live runner
instead of starting a second one, and `flwr stop` stops an adopted runner for real."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
from helpers import APP_DIR

BIN = Path(sys.executable).parent
LONG_RUN = ["-c", "num-server-rounds=50", "-c", "sleep-partition=0", "-c", "sleep-s=1.0"]


def _cli(*args: str, timeout: float = 180, cwd: Path | None = None):
    return subprocess.run([str(BIN / args[0]), *args[1:]], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL, cwd=cwd)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _runners_of(run_dir: Path) -> list[psutil.Process]:
    """Live runner processes executing ``run_dir`` (foreground or service-started). A
    runner's own child caught between fork and exec still shows the runner's command line:
    it is not a second runner (those are started by services, never by a runner)."""
    found = []
    for p in psutil.process_iter(["cmdline", "status", "ppid"]):
        try:
            cmd = " ".join(p.info["cmdline"] or [])
            if p.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            if "flwr_hpc.server.runner" in cmd and str(run_dir) in cmd:
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    pids = {p.pid for p in found}
    return [p for p in found if p.info["ppid"] not in pids]


def _describe(procs: list[psutil.Process]) -> str:
    out = []
    for p in procs:
        try:
            out.append(f"pid {p.pid} ppid {p.ppid()} started {p.create_time():.2f}")
        except psutil.NoSuchProcess:
            out.append(f"pid {p.pid} (gone)")
    return "; ".join(out)


def _service_pid(home: Path) -> int:
    return int(json.loads((home / "hpc" / "superlink.json").read_text())["pid"])


def _start_long_run(home: Path) -> Path:
    run = _cli("flwr", "run", ".", "hpc", *LONG_RUN, cwd=APP_DIR)
    assert run.returncode == 0, run.stdout + run.stderr
    run_id = run.stdout.split("Successfully started run ")[1].split()[0]
    run_dir = home / "hpc" / "runs" / run_id
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        tasks = run_dir / "tasks.jsonl"
        if tasks.exists() and tasks.read_text().count("\n") >= 8:  # round 1 done
            return run_dir
        time.sleep(0.3)
    raise AssertionError("the run did not get going")


def _kill_everything(home: Path) -> None:
    for p in psutil.process_iter():
        try:
            if p.environ().get("FLWR_HOME") == str(home) and p.pid != os.getpid():
                p.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass


@pytest.mark.slow(22)
def test_a_killed_service_leaves_its_runner_to_the_next_one_and_stop_stops_it(flwr_home):
    from flwr_hpc.server.runs import read_status, runner_holding

    assert _cli("flwr-hpc", "up", "--port", str(_port())).returncode == 0
    try:
        run_dir = _start_long_run(flwr_home)
        (runner,) = _runners_of(run_dir)
        os.kill(_service_pid(flwr_home), signal.SIGKILL)  # the service dies, its runner not
        time.sleep(1)
        assert runner.is_running() and runner_holding(run_dir) == runner.pid

        # resume while the runner lives: refused, nothing started
        res = _cli("flwr-hpc", "resume", run_dir.name, "--foreground")
        assert res.returncode == 1 and "still running (runner pid" in res.stderr
        assert _runners_of(run_dir) == [runner]

        up = _cli("flwr-hpc", "up", "--port", str(_port()))
        assert up.returncode == 0, up.stderr
        time.sleep(2)
        assert _runners_of(run_dir) == [runner]  # adopted, not resumed a second time
        log = (flwr_home / "hpc" / "superlink.log").read_text()
        assert f"adopted run {run_dir.name}" in log

        stop = _cli("flwr", "stop", run_dir.name, "hpc", cwd=APP_DIR)
        assert stop.returncode == 0, stop.stdout + stop.stderr
        assert "success" in (stop.stdout + stop.stderr).lower()
        runner.wait(timeout=30)  # really stopped, not just reported
        assert runner_holding(run_dir) is None
        time.sleep(3)  # nothing writes "completed" afterwards
        status = read_status(run_dir)
        assert (status["status"], status["sub_status"]) == ("finished", "stopped")
    finally:
        _cli("flwr-hpc", "down")
        _kill_everything(flwr_home)


@pytest.mark.slow(50)
def test_two_ups_at_once_never_put_two_runners_on_a_run(flwr_home):
    """The service and its runner were SIGKILLed mid-run; then two `up`s race. Three
    times: every time exactly one runner resumes the run, and no round is trained twice."""
    from flwr_hpc.server.runs import read_status

    assert _cli("flwr-hpc", "up", "--port", str(_port())).returncode == 0
    try:
        run_dir = _start_long_run(flwr_home)
        for attempt in range(3):
            _kill_everything(flwr_home)  # service and runner die together
            time.sleep(1)
            assert _runners_of(run_dir) == []
            ports = [_port(), _port()]
            results: list = [None, None]

            def up(i: int, port: int, results: list = results) -> None:
                results[i] = _cli("flwr-hpc", "up", "--port", str(port))

            threads = [threading.Thread(target=up, args=(i, p)) for i, p in enumerate(ports)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
            assert any(r.returncode == 0 for r in results), [r.stderr for r in results]
            most, seen = 0, ""
            deadline = time.monotonic() + 8
            while time.monotonic() < deadline:  # watch for a second runner for a while
                now = _runners_of(run_dir)
                if len(now) > most:
                    most, seen = len(now), _describe(now)
                time.sleep(0.2)
            assert most == 1, f"attempt {attempt}: {most} runners on one run ({seen})"
            assert read_status(run_dir)["status"] in ("pending", "starting", "running")
        from flwr_hpc.server.runs import runner_holding

        (runner,) = _runners_of(run_dir)
        assert runner_holding(run_dir) == runner.pid  # the one runner holds the lock
    finally:
        _cli("flwr-hpc", "down")
        _kill_everything(flwr_home)


def test_a_killed_foreground_run_is_not_resumed_behind_the_users_back(flwr_home):
    from flwr_hpc.server.runs import check_resumable, read_status

    proc = subprocess.Popen([str(BIN / "flwr-hpc"), "run", str(APP_DIR), *LONG_RUN],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        run_dir = None
        while time.monotonic() < deadline:
            dirs = list((flwr_home / "hpc" / "runs").glob("*/tasks.jsonl"))
            if dirs and dirs[0].read_text().count("\n") >= 4:
                run_dir = dirs[0].parent
                break
            time.sleep(0.3)
        assert run_dir is not None
        os.killpg(proc.pid, signal.SIGKILL)  # the user's terminal died
        proc.wait()
        time.sleep(1.5)  # site workers notice and exit
        assert read_status(run_dir)["status"] == "running"

        assert _cli("flwr-hpc", "up", "--port", str(_port())).returncode == 0
        time.sleep(2)
        assert _runners_of(run_dir) == []  # not resumed in the background
        status = read_status(run_dir)
        assert (status["status"], status["sub_status"]) == ("finished", "failed")
        assert f"flwr-hpc resume {run_dir.name}" in status["details"]
        check_resumable(run_dir)  # ... but still resumable on request
    finally:
        _cli("flwr-hpc", "down")
        _kill_everything(flwr_home)
