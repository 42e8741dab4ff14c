"""Shared login nodes and filesystems (#20, item 6): records name node, pid and start
time; locks hold across processes with flock, without flock, and across "nodes"."""

from __future__ import annotations

import argparse
import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

from flwr_hpc import locks
from flwr_hpc.locks import ExclusiveLock, Holder, holder_state, this_process

HOLD = textwrap.dedent("""
    import sys, time
    from flwr_hpc.locks import ExclusiveLock
    lock = ExclusiveLock(sys.argv[1])
    assert lock.acquire(timeout=5)
    print("held", flush=True)
    time.sleep(120)
""")


def _holder_process(path, env=None):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], stdout=subprocess.PIPE,
                            text=True, env={**os.environ, **(env or {})})
    assert proc.stdout.readline().strip() == "held"
    return proc


@pytest.fixture
def no_flock(monkeypatch):
    """A mount without flock (Lustre/NFS without the option): flock fails with ENOLCK."""
    calls = []

    def flock(fd, op):
        calls.append(op)
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(locks.fcntl, "flock", flock)
    return calls


def test_a_holder_names_node_pid_and_start_and_reads_old_bare_pids():
    me = this_process()
    assert me.node == locks.node_name() and me.pid == os.getpid()
    assert me.started == pytest.approx(psutil.Process().create_time(), abs=0.01)
    assert Holder.parse(me.text()) == me
    old = Holder.parse("4242\n")  # lock files written before records named their node
    assert old == Holder(locks.node_name(), 4242, 0.0)


def test_holder_state_tells_alive_dead_reused_and_elsewhere():
    me = this_process()
    assert holder_state(me) == "alive"
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    assert holder_state(Holder(me.node, int(done.stdout), me.started)) == "dead"
    # our pid, but a start time an hour earlier: the pid was reused by a later process
    assert holder_state(Holder(me.node, me.pid, me.started - 3600)) == "dead"
    assert holder_state(Holder("login2", me.pid, me.started)) == "elsewhere"


@pytest.mark.parametrize("mode", ["flock", "file"])
def test_a_second_process_cannot_take_a_held_lock_and_takes_it_after_a_kill(
        tmp_path, monkeypatch, mode):
    monkeypatch.setenv(locks.LOCK_MODE_ENV, mode)
    path = tmp_path / "runner.lock"
    proc = _holder_process(path, {locks.LOCK_MODE_ENV: mode})
    try:
        lock = ExclusiveLock(path)
        assert not lock.acquire(timeout=0.5)
        holder = lock.holder()
        assert holder is not None and holder.pid == proc.pid and holder.node == locks.node_name()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    # the killer left its owner file behind; on this node a dead holder is taken over
    assert (path.parent / "runner.lock.owner").exists()
    assert lock.acquire(timeout=2)
    assert lock.holder() == this_process()
    lock.release()
    assert not (path.parent / "runner.lock.owner").exists()
    assert lock.holder() is None


def test_without_flock_the_owner_file_is_the_lock(tmp_path, no_flock):
    path = tmp_path / "service.lock"
    first, second = ExclusiveLock(path), ExclusiveLock(path)
    assert first.acquire(timeout=0)
    assert no_flock, "flock was tried first"
    assert not second.acquire(timeout=0.3)  # the owner (this process) is alive
    assert second.holder() == this_process()
    first.release()
    assert second.acquire(timeout=0)
    second.release()


def test_a_lock_held_from_another_node_is_never_taken_over(tmp_path):
    path = tmp_path / "runner.lock"
    other = Holder("login2", os.getpid(), time.time() - 10)  # alive there, for all we know
    (tmp_path / "runner.lock.owner").write_text(other.text())
    lock = ExclusiveLock(path)
    assert not lock.acquire(timeout=0.5)
    assert lock.holder() == other
    # a dead holder of this node is taken over
    dead = Holder(locks.node_name(), other.pid, other.started - 3600)
    (tmp_path / "runner.lock.owner").write_text(dead.text())
    assert lock.acquire(timeout=0)
    lock.release()


def test_a_run_held_by_a_runner_on_another_node_is_not_resumed(tmp_path):
    from flwr_hpc.errors import FlwrHpcError
    from flwr_hpc.server.runs import check_resumable, runner_holder

    run_dir = tmp_path / "123"
    run_dir.mkdir()
    (run_dir / "run.json").write_text("{}")
    (run_dir / "status.json").write_text(json.dumps({"run_id": 123, "status": "running"}))
    other = Holder("login2", 4242, 1.0)
    (run_dir / "runner.lock.owner").write_text(other.text())
    assert runner_holder(run_dir) == other
    with pytest.raises(FlwrHpcError, match="pid 4242 on login2"):
        check_resumable(run_dir)


def _args(**kw):
    return argparse.Namespace(**kw)


@pytest.fixture
def record_from_login2(flwr_home):
    """$HOME shared with login node "login2", whose service's pid is, here, a live
    process of someone else (a sleep we own, standing in for it)."""
    bystander = subprocess.Popen(["sleep", "120"])
    (flwr_home / "hpc").mkdir()
    (flwr_home / "hpc" / "superlink.json").write_text(json.dumps({
        "pid": bystander.pid, "host": "127.0.0.1", "port": 1, "federation": "local",
        "node": "login2", "started": psutil.Process(bystander.pid).create_time()}))
    yield flwr_home, bystander
    bystander.kill()
    bystander.wait()


def test_down_up_and_resume_on_another_login_node_touch_nothing(record_from_login2, capsys):
    from flwr_hpc.control import cli

    home, bystander = record_from_login2
    assert cli.cmd_down(_args(forget=False)) == 1
    assert "runs on login node login2" in capsys.readouterr().err
    assert bystander.poll() is None  # not signalled
    assert cli.cmd_up(_args(host="127.0.0.1", port=19999, overrides=[], config_dir=[])) == 1
    assert "login node login2" in capsys.readouterr().err
    run_dir = home / "hpc" / "runs" / "7"
    run_dir.mkdir(parents=True)
    (run_dir / "run.json").write_text("{}")
    (run_dir / "status.json").write_text(json.dumps({"run_id": 7, "status": "running"}))
    (run_dir / "checkpoint").mkdir()
    assert cli.cmd_resume(_args(run_id=7, foreground=False)) == 1
    assert "resume the run from that node" in capsys.readouterr().err
    assert bystander.poll() is None
    assert (home / "hpc" / "superlink.json").exists()
    # that node is gone for good: forget its record, still signalling nothing
    assert cli.cmd_down(_args(forget=True)) == 0
    assert not (home / "hpc" / "superlink.json").exists() and bystander.poll() is None
