"""The stock Flower CLI (`flwr run/ls/stop`) against the HPC SuperLink started by `flwr-hpc up`."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import psutil
from helpers import APP_DIR, BIN
from helpers import cli as _cli


def _processes_of(home: Path) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter():
        try:
            if p.environ().get("FLWR_HOME") == str(home) and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return [p for p in found if p.pid != os.getpid()]


def _runs(home: Path) -> dict[int, dict]:
    res = _cli("flwr", "ls", "hpc", "--format", "json", cwd=APP_DIR)
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout[res.stdout.index("{"):])
    return {int(r["run-id"]): r for r in data["runs"]}


def test_flwr_run_stream_ls_and_down(superlink, flwr_home):
    cfg = (flwr_home / "config.toml").read_text()
    assert f'address = "127.0.0.1:{superlink}"' in cfg and "[superlink.local]" in cfg

    again = _cli("flwr-hpc", "up", "--port", str(superlink))
    assert again.returncode == 0 and "already running" in again.stdout

    # another FLWR_HOME must not mistake this service for its own
    other_home = flwr_home.parent / "other_home"
    other_home.mkdir()
    clash = subprocess.run([str(BIN / "flwr-hpc"), "up", "--port", str(superlink)],
                           capture_output=True, text=True, timeout=60,
                           env={**os.environ, "FLWR_HOME": str(other_home)})
    assert clash.returncode == 1
    assert f"port {superlink} is already served" in clash.stderr
    assert str(flwr_home) in clash.stderr
    assert not (other_home / "config.toml").exists()

    run = _cli("flwr", "run", ".", "hpc", "--stream", cwd=APP_DIR)
    assert run.returncode == 0, run.stderr
    assert "Successfully started run" in run.stdout
    out = run.stdout
    for marker in ("[ROUND 1/3]", "[ROUND 3/3]", "train: 4/4 replies", "finished"):
        assert marker in out, marker
    run_id = int(out.split("Successfully started run ")[1].split()[0])

    runs = _runs(flwr_home)
    assert runs[run_id]["status"] == "finished:completed"
    assert runs[run_id]["fab-id"] == "flwrhpc/quickstart-numpy"
    assert runs[run_id]["network-traffic"]["outbound-bytes"] > 0
    tasks = (flwr_home / "hpc" / "runs" / str(run_id) / "tasks.jsonl").read_text().splitlines()
    assert len(tasks) == 3 * 2 * 4

    status = _cli("flwr-hpc", "status")
    assert "up" in status.stdout and "alpha" in status.stdout and str(run_id)[:8] in status.stdout

    assert _processes_of(flwr_home)  # the service is running ...
    down = _cli("flwr-hpc", "down")
    assert down.returncode == 0 and "stopped" in down.stdout
    deadline = time.monotonic() + 10
    while _processes_of(flwr_home) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _processes_of(flwr_home) == []  # ... and nothing is left after `down`


def test_flwr_stop_stops_a_running_run(superlink, flwr_home):
    run = _cli("flwr", "run", ".", "hpc", "-c", "sleep-partition=0", "-c", "sleep-s=300.0",
               cwd=APP_DIR)
    assert run.returncode == 0, run.stderr
    run_id = int(run.stdout.split("Successfully started run ")[1].split()[0])
    deadline = time.monotonic() + 60
    while _runs(flwr_home)[run_id]["status"] != "running" and time.monotonic() < deadline:
        time.sleep(0.5)
    time.sleep(3)  # let the sleeping task start at its site
    stop = _cli("flwr", "stop", str(run_id), "hpc", cwd=APP_DIR)
    assert stop.returncode == 0, stop.stdout + stop.stderr
    assert _runs(flwr_home)[run_id]["status"] == "finished:stopped"
    # only the service itself remains: the runner and its site workers are gone
    remaining = _processes_of(flwr_home)
    assert all("flwr_hpc.control.service" in " ".join(p.cmdline()) for p in remaining), remaining
