"""Unmodified Flower apps on an HPC federation give what Flower's own runtime gives (#15).

Five compatibility apps, written against Flower's public APIs (``tests/apps/compat_*``),
each run three ways and compared:

- under Flower's own Simulation Runtime (``flwr.simulation.run_simulation``): the reference;
- through ``flwr-hpc run APP`` (the runner in the foreground);
- through ``flwr-hpc up`` + the stock ``flwr run APP hpc --stream``.

The apps: a legacy ``NumPyClient`` + ``ServerApp(server_fn=...)`` with
``flwr.server.strategy.FedAvg``; a ``SecAggPlusWorkflow`` app with ``secaggplus_mod`` and a
planned client dropout; raw-grid apps that push fire-and-forget messages and read
``Context.state`` counters, call ``send_and_receive`` from one thread per node, and take
``len()`` of a query's replies and iterate them twice.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from flower_reference import run_reference
from helpers import TESTS_DIR

BIN = Path(sys.executable).parent
APPS = TESTS_DIR / "apps"
# (app, mode): one compatibility app each
CASES = [("compat_legacy", ""), ("compat_secagg", ""), ("compat_raw", "fire-and-forget"),
         ("compat_raw", "threads"), ("compat_raw", "query-len")]
IDS = ["legacy-server_fn", "secagg+", "fire-and-forget", "threads", "query-len"]
# what each app prints from its ServerApp (must reach the run's log and `flwr run --stream`)
PRINTED = {"compat_legacy": "compat-legacy: server_fn built the strategy",
           "compat_raw": "compat-raw {mode}: done"}


def _run_config(result_file: Path, mode: str) -> list[str]:
    args = ["-c", f'result-file="{result_file}"']
    return args + (["-c", f'mode="{mode}"'] if mode else [])


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Each app's result under Flower's own runtime, computed once per module."""
    cache: dict[tuple[str, str], dict] = {}

    def get(app: str, mode: str) -> dict:
        if (app, mode) not in cache:
            out = tmp_path_factory.mktemp("ref") / "result.json"
            res = run_reference(APPS / app, 4, out, mode)
            assert res.returncode == 0 and out.exists(), res.stderr[-3000:]
            cache[app, mode] = json.loads(out.read_text())
        return cache[app, mode]

    return get


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    """`flwr-hpc up` in a FLWR_HOME of its own, shared by this module's tests."""
    home = tmp_path_factory.mktemp("svc") / "flwr_home"
    home.mkdir()
    env = {**os.environ, "FLWR_HOME": str(home)}
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    up = subprocess.run([str(BIN / "flwr-hpc"), "up", "--port", str(port)], capture_output=True,
                        text=True, env=env, timeout=120, stdin=subprocess.DEVNULL)
    assert up.returncode == 0, up.stderr
    yield env
    subprocess.run([str(BIN / "flwr-hpc"), "down"], env=env, timeout=60,
                   capture_output=True, stdin=subprocess.DEVNULL)


def assert_same_result(app: str, mode: str, got: dict, ref: dict) -> None:
    """The app's result as Flower's runtime gave it, with app-specific tolerances."""
    if app == "compat_legacy":
        assert got["fit_pids"] == ref["fit_pids"] == {str(r): [0, 1, 2, 3] for r in (1, 2, 3)}
        assert got["eval_pids"] == ref["eval_pids"]
        assert sorted(got["params"]) == sorted(ref["params"]) == ["0", "1", "2", "3"]
        for r in ref["params"]:
            for a, b in zip(got["params"][r], ref["params"][r], strict=True):
                np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)
    elif app == "compat_secagg":
        # SecAgg+ quantizes with stochastic rounding: equal to its quantization step, and
        # equal to the weighted mean the clients' updates imply, with partition 3 missing
        # from round 2 (its planned dropout; the server unmasks without it)
        expected, prev = {}, 0.0
        for r in (1, 2, 3):
            pids = [0, 1, 2] if r == 2 else [0, 1, 2, 3]
            w = np.array([10 * (p + 1) for p in pids], dtype=float)
            prev += float(np.dot(w, [(p + 1) * 0.1 + r * 0.01 for p in pids]) / w.sum())
            expected[str(r)] = prev
        for r in ("1", "2", "3"):
            np.testing.assert_allclose(got["params"][r][0], expected[r], atol=5e-4)
            np.testing.assert_allclose(got["params"][r][1], 1 + expected[r], atol=5e-4)
            np.testing.assert_allclose(ref["params"][r][0], expected[r], atol=5e-4,
                                       err_msg="Flower's own reference run went wrong")
            for a, b in zip(got["params"][r], ref["params"][r], strict=True):
                np.testing.assert_allclose(a, b, rtol=0, atol=5e-4)
    elif mode == "fire-and-forget":
        assert got["counts"] == ref["counts"] == {str(p): 3 for p in range(4)}
    elif mode == "threads":
        assert got["threads_done"] == ref["threads_done"] == 4
        assert got["by_pid"] == ref["by_pid"]
        assert got["by_pid"]["2"] == [[[1, [1.0] * 3, 2]], [[1, [5.0] * 3, 2]]]
    elif mode == "query-len":
        assert got["len"] == ref["len"] == 4
        assert got["first_pass"] == got["second_pass"] == ref["second_pass"] == [0, 1, 2, 3]
    else:
        raise AssertionError(f"no comparison for {app} {mode}")


def _run_dir(home: Path, output: str) -> Path:
    run_id = output.split("run ")[-1].split(":")[0].strip()
    return home / "hpc" / "runs" / run_id


@pytest.mark.parametrize(("app", "mode"), CASES, ids=IDS)
def test_flwr_hpc_run_matches_flower(app, mode, reference, flwr_home, tmp_path):
    result = tmp_path / "result.json"
    res = subprocess.run([str(BIN / "flwr-hpc"), "run", str(APPS / app),
                          *_run_config(result, mode)], capture_output=True, text=True,
                         timeout=300, stdin=subprocess.DEVNULL)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert_same_result(app, mode, json.loads(result.read_text()), reference(app, mode))
    if app in PRINTED:  # the ServerApp's print() is in the run's log (and on the console)
        run_dir = _run_dir(flwr_home, res.stdout.strip().splitlines()[-1])
        assert PRINTED[app].format(mode=mode) in (run_dir / "log.txt").read_text()


@pytest.mark.parametrize(("app", "mode"), CASES, ids=IDS)
def test_stock_flwr_run_matches_flower(app, mode, reference, service, tmp_path):
    result = tmp_path / "result.json"
    res = subprocess.run([str(BIN / "flwr"), "run", ".", "hpc", "--stream",
                          *_run_config(result, mode)], capture_output=True, text=True,
                         cwd=APPS / app, env=service, timeout=300, stdin=subprocess.DEVNULL)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "Successfully started run" in res.stdout
    assert_same_result(app, mode, json.loads(result.read_text()), reference(app, mode))
    if app in PRINTED:  # Flower streams the ServerApp's stdout into `flwr log`
        assert PRINTED[app].format(mode=mode) in res.stdout


def test_legacy_app_keeps_its_site_workers_warm(flwr_home, tmp_path):
    """Flower's legacy Server sends from a new thread pool every round; no site worker may
    restart between rounds (each site's tasks run in at most its ``workers`` processes,
    and after round 1 the ClientApp is already loaded)."""
    res = subprocess.run([str(BIN / "flwr-hpc"), "run", str(APPS / "compat_legacy"),
                          *_run_config(tmp_path / "r.json", "")], capture_output=True,
                         text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert res.returncode == 0, res.stderr[-3000:]
    run_dir = _run_dir(flwr_home, res.stdout.strip().splitlines()[-1])
    tasks = [json.loads(x) for x in (run_dir / "tasks.jsonl").read_text().splitlines()]
    assert len(tasks) == 3 * 2 * 4 and all(t["outcome"] == "ok" for t in tasks)
    workers = {"alpha": 1, "beta": 2, "gamma": 1}  # conf/federation/local.yaml
    for site, n in workers.items():
        pids = {t["worker_pid"] for t in tasks if t["site"] == site}
        assert 1 <= len(pids) <= n, (site, pids)
    later = [t for t in tasks if t["round"] != "1"]
    assert max(t["load_s"] for t in later) < 0.05  # the ClientApp was loaded already


def _descendants(pid: int) -> list[psutil.Process]:
    return psutil.Process(pid).children(recursive=True)


def _wait_for_task_in_flight(proc: subprocess.Popen, home: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        logs = list((home / "hpc" / "runs").glob("*/debug.txt"))  # has the DEBUG lines
        if logs and "submitted" in logs[0].read_text():
            time.sleep(2)  # the hanging client is now inside fit
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    raise AssertionError("the run never submitted a task")


@pytest.mark.parametrize(("app", "config", "sig"), [
    ("quickstart_numpy", ["-c", "sleep-partition=0", "-c", "sleep-s=3600.0"], signal.SIGTERM),
    ("compat_legacy", ["-c", "hang-partition=0"], signal.SIGINT),
], ids=["message-api-SIGTERM", "legacy-thread-pool-SIGINT"])
def test_flwr_hpc_run_stops_on_a_signal(app, config, sig, flwr_home):
    """A run whose client never answers (the app waits up to an hour, or 120 s in the
    legacy Server's thread pool) ends within the stop grace period and leaves nothing
    running: no runner thread, no site worker."""
    from flwr_hpc.server.runner import STOP_GRACE_S

    proc = subprocess.Popen([str(BIN / "flwr-hpc"), "run", str(APPS / app), *config],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            stdin=subprocess.DEVNULL)
    try:
        _wait_for_task_in_flight(proc, flwr_home, 120)
        workers = _descendants(proc.pid)
        assert workers  # the site workers run (as children of the runner)
        t0 = time.monotonic()
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=STOP_GRACE_S + 15)
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert took < STOP_GRACE_S, (took, out[-3000:])
    assert proc.returncode == 130, out[-3000:]
    assert "finished:stopped" in out
    time.sleep(1)
    alive = [p for p in workers if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert alive == []
    status = json.loads(next((flwr_home / "hpc" / "runs").glob("*/status.json")).read_text())
    assert (status["status"], status["sub_status"]) == ("finished", "stopped")
    tasks = [json.loads(x) for x in
             next((flwr_home / "hpc" / "runs").glob("*/tasks.jsonl")).read_text().splitlines()]
    assert "stopped" in {t["outcome"] for t in tasks}  # not a missed deadline
    assert "timeout" not in {t["outcome"] for t in tasks}


def test_run_takes_overrides_after_options_and_names_a_bad_run_config(flwr_home, tmp_path):
    """`flwr-hpc run APP -c k=v federation=x`: Hydra overrides after the options."""
    result = tmp_path / "r.json"
    res = subprocess.run([str(BIN / "flwr-hpc"), "run", str(APPS / "compat_raw"), "-c",
                          f'result-file="{result}"', "-c", 'mode="query-len"', "-c",
                          "num-nodes=3", "federation=local", "federation.sites.beta.clients=1"],
                         capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads(result.read_text())["len"] == 3  # beta now hosts one client, not two

    bad = subprocess.run([str(BIN / "flwr-hpc"), "run", str(APPS / "compat_raw"), "-c",
                          "mode=query-len"], capture_output=True, text=True, timeout=120,
                         stdin=subprocess.DEVNULL)
    assert bad.returncode == 2
    assert "Traceback" not in bad.stderr
    assert "mode=query-len" in bad.stderr and "-c 'mode=\"query-len\"'" in bad.stderr
    assert not list((flwr_home / "hpc" / "runs").glob("*/status.json"))[1:]  # no 2nd run
