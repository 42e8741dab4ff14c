"""The HPC SuperLink keeps serving through a full disk and stray files (issue #16, item 5)."""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from helpers import APP_DIR

BIN = Path(sys.executable).parent


class _ExitedRunner:
    """A runner process that has ended with ``code`` (what the reaper polls)."""

    def __init__(self, code: int) -> None:
        self.pid, self.code = 0, code

    def poll(self) -> int:
        return self.code


def _wait_for(predicate, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


def test_a_full_disk_does_not_kill_the_reaper_and_the_run_still_ends(
        flwr_home, quickstart_fab, monkeypatch):
    import flwr_hpc.control.service as service
    from flwr_hpc.config import load_federation
    from flwr_hpc.server.runs import prepare_run, read_status, update_status

    link = service.HPCSuperLink(load_federation([]), flwr_home)
    try:
        run_dir = prepare_run(quickstart_fab, {}, link.federation, home=flwr_home)
        update_status(run_dir, status="running")
        run_id = int(run_dir.name)
        disk_full = {"on": True}

        def update_on_a_full_disk(*args, **kwargs):
            if disk_full["on"]:
                raise OSError(errno.ENOSPC, "No space left on device")
            return update_status(*args, **kwargs)

        monkeypatch.setattr(service, "update_status", update_on_a_full_disk)
        with link._lock:
            link._procs[run_id] = _ExitedRunner(1)  # the runner died (it could not write)
        # the run is reported finished (from memory) although its file cannot be written
        assert _wait_for(lambda: link.list_runs()[run_id].status.status == "finished")
        assert link.list_runs()[run_id].status.sub_status == "failed"
        assert read_status(run_dir)["status"] == "running"
        time.sleep(1.5)  # more reaper passes fail on the disk ...
        assert link._reaper.is_alive()  # ... and the reaper lives on
        disk_full["on"] = False  # space freed: the status reaches the file
        assert _wait_for(lambda: read_status(run_dir).get("status") == "finished")
        assert read_status(run_dir)["details"] == "runner exited with code 1"
    finally:
        link.shutdown()


def test_stray_entries_in_runs_do_not_stop_up_or_ls(flwr_home, quickstart_fab):
    from flwr_hpc.config import load_federation
    from flwr_hpc.server.runs import prepare_run, update_status

    runs = flwr_home / "hpc" / "runs"
    good = prepare_run(quickstart_fab, {}, load_federation([]), home=flwr_home)
    update_status(good, status="finished", sub_status="completed")
    (runs / "notes.txt").write_text("a stray file")
    (runs / "backup").mkdir()
    (runs / "123").mkdir()
    (runs / "123" / "status.json").write_text("{torn")
    (runs / "456").mkdir()
    (runs / "456" / "status.json").write_bytes(b"\xff\xfe not utf-8")

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    up = subprocess.run([str(BIN / "flwr-hpc"), "up", "--port", str(port)],
                        capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    try:
        assert up.returncode == 0, up.stderr
        ls = subprocess.run([str(BIN / "flwr"), "ls", "hpc", "--format", "json"],
                            capture_output=True, text=True, timeout=120, cwd=APP_DIR,
                            stdin=subprocess.DEVNULL)
        assert ls.returncode == 0, ls.stdout + ls.stderr
        data = json.loads(ls.stdout[ls.stdout.index("{"):])
        assert [int(r["run-id"]) for r in data["runs"]] == [int(good.name)]
        text = (flwr_home / "hpc" / "superlink.log").read_text()
        for name in ("notes.txt", "backup", "123", "456"):
            assert f"{runs / name}: not a run directory" in text
    finally:
        subprocess.run([str(BIN / "flwr-hpc"), "down"], capture_output=True, timeout=60)
    assert os.path.exists(runs / "notes.txt")  # skipped, never removed


def _up(*args: str, env: dict | None = None, prefix: tuple[str, ...] = ()):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    res = subprocess.run([*prefix, str(BIN / "flwr-hpc"), "up", "--port", str(port), *args],
                         capture_output=True, text=True, timeout=120, env=env,
                         stdin=subprocess.DEVNULL)
    return res, port


def _service_processes(home: Path) -> list:
    import psutil

    out = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if "flwr_hpc.control.service" in " ".join(p.info["cmdline"] or []) and \
                    p.environ().get("FLWR_HOME") == str(home):
                out.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return out


def test_a_non_utf8_config_toml_stops_up_before_it_starts_anything(flwr_home):
    (flwr_home / "config.toml").write_bytes(b"[superlink]\nname = \"\xff\xfe\"\n")
    res, _ = _up()
    assert res.returncode == 2
    assert f"{flwr_home / 'config.toml'}" in res.stderr and "not a UTF-8 TOML" in res.stderr
    assert _service_processes(flwr_home) == []
    assert (flwr_home / "config.toml").read_bytes().startswith(b"[superlink]\nname")


def test_up_talks_to_loopback_without_the_users_proxy(flwr_home):
    """With HTTP(S)_PROXY set and no NO_PROXY, `up` used to send its health checks through
    the proxy, time out, and kill the service it had just started."""
    env = {**os.environ, "HTTP_PROXY": "http://127.0.0.1:9", "http_proxy":
           "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9", "NO_PROXY": "",
           "no_proxy": ""}
    res, port = _up(env=env)
    try:
        assert res.returncode == 0, res.stderr
        status = subprocess.run([str(BIN / "flwr-hpc"), "status"], capture_output=True,
                                text=True, timeout=60, env=env)
        assert f"127.0.0.1:{port}" in status.stdout and "up" in status.stdout
    finally:
        subprocess.run([str(BIN / "flwr-hpc"), "down"], capture_output=True, timeout=60,
                       env=env)


def test_many_idle_connections_under_a_low_file_limit_do_not_silence_the_service(flwr_home):
    res, port = _up(prefix=("prlimit", "--nofile=512:512"))
    assert res.returncode == 0, res.stderr
    idle = []
    try:
        for _ in range(600):  # more than the service's descriptor limit, all idle
            try:
                idle.append(socket.create_connection(("127.0.0.1", port), timeout=5))
            except OSError:
                break
        from flwr_hpc.control.service import IDLE_TIMEOUT_S

        time.sleep(IDLE_TIMEOUT_S + 1.5)  # the idle ones are dropped, the service answers
        ls = subprocess.run([str(BIN / "flwr"), "ls", "hpc"], capture_output=True, text=True,
                            timeout=60, cwd=APP_DIR, stdin=subprocess.DEVNULL)
        assert ls.returncode == 0, ls.stdout + ls.stderr
        idle[0].settimeout(5)
        assert idle[0].recv(1) == b""  # closed by the service, not kept forever
        log = (flwr_home / "hpc" / "superlink.log").read_text()
        assert "connections open already" in log
    finally:
        for s in idle:
            s.close()
        subprocess.run([str(BIN / "flwr-hpc"), "down"], capture_output=True, timeout=60)
