"""The runner: one process per run, executing a ServerApp over an ``HPCGrid``.

It does what Flower's ``flwr-serverapp`` does, with ``HPCGrid`` instead of ``HttpGrid``:
install the FAB (checked and installed atomically by :mod:`flwr_hpc.fab`), fuse the run config
(``get_fused_config_from_dir``), set ``TaskIdentity``, and call
``flwr.server.run_serverapp.run``. Everything about a run lives in its run directory:

    run.json      what to run (FAB hash, overrides, federation)     -- written at start
    app.fab       the FAB bytes (sha256-verified before use)
    status.json   pending / starting / running / finished:{completed,failed,stopped}
    log.txt       the run's log (what ``flwr log`` / ``--stream`` show), timestamped
    debug.txt     the same with every DEBUG line (Flower's round loop, each task)
    tasks.jsonl   one record per task (see ``flwr_hpc.server.telemetry``)
    checkpoint/   the last completed rounds (``flwr_hpc.strategy.checkpoint``), for resume

An interrupted run (runner killed, node lost, SuperLink restarted) is resumed by running
the same run directory again (:func:`check_resumable` + :func:`execute_run`): the ServerApp
finds the checkpoint and continues after the last completed round.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import random
import signal
import sys
import threading
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import Any

from flwr_hpc._proc import keep_caches_under, large_buffer_env, return_large_buffers
from flwr_hpc.config import SUPERLINK_NODE_ID, read_federation
from flwr_hpc.errors import ConfigError
from flwr_hpc.payload.objects import sha256_hex
from flwr_hpc.protocol import ENV_RUN_DIR
from flwr_hpc.server.runs import (
    RunnerBusy,
    RunnerLock,
    checkpoint_round,
    flwr_home,
    now_iso,
    runner_holder,
    update_status,
)
from flwr_hpc.server.telemetry import Progress

log = logging.getLogger("flwr_hpc")

LOG_FORMAT = "%(levelname)-8s %(message)s"
# set (e.g. by `flwr-hpc up -v` / `flwr-hpc run -v`): log.txt (the stream) at DEBUG, with
# Flower's per-round lines and every task's end; debug.txt always has them
ENV_VERBOSE = "FLWR_HPC_VERBOSE"
# log.txt (what `flwr log` and `--stream` show): every line timestamped, UTC
FILE_LOG_FORMAT = "%(asctime)s %(levelname)-8s %(message)s"
# Set for the ServerApp while it runs: where it may write outputs (adapters, metrics).


class RunStopped(BaseException):
    """Raised in the runner's main thread when the run is asked to stop (SIGTERM/SIGINT).
    A ``BaseException``, like ``KeyboardInterrupt``: an app's ``except Exception`` must
    not swallow a stop.
    """


# After a stop request the run has this long to end by itself (its grid wakes every
# waiting call, the ServerApp unwinds, site workers are stopped); then the runner stops
# its workers and exits regardless.
STOP_GRACE_S = 20.0
_ACTIVE: dict[str, Any] = {}  # the run this process executes now: its grid and run dir


def request_stop(signum: int | None = None, frame: Any = None) -> None:
    """Signal handler (SIGTERM, SIGINT): stop the run this process executes. Wakes every
    thread waiting on the grid (Flower's legacy Server waits in a thread pool that the
    main thread joins), raises :class:`RunStopped` in the main thread, and arms a
    watchdog that ends the process after :data:`STOP_GRACE_S`.
    """
    grid = _ACTIVE.get("grid")
    if grid is not None:
        grid.interrupt()
    if "watchdog" not in _ACTIVE:
        watchdog = threading.Timer(STOP_GRACE_S, _force_stop)
        watchdog.daemon = True
        watchdog.start()
        _ACTIVE["watchdog"] = watchdog
    raise RunStopped()


def _force_stop() -> None:
    """The run did not end within the grace period: stop its workers, record it, exit."""
    grid, run_dir = _ACTIVE.get("grid"), _ACTIVE.get("run_dir")
    log.error("run did not stop within %.0f s of the request; stopping its site workers "
              "and exiting", STOP_GRACE_S)
    try:
        if grid is not None:
            grid.close()
    finally:
        if run_dir is not None:
            update_status(run_dir, status="finished", sub_status="stopped",
                          details="stopped by request (forced after the grace period)",
                          finished_at=now_iso())
        os._exit(1)


class RunFailed(Exception):
    """The ServerApp returned, but the run did not do what it was for."""


def no_task_succeeded(records: list[dict[str, Any]]) -> str:
    """Why a run whose every task failed is not a completed run ('' if some task worked).
    Messages that were never sent (an app that stops before its first round) fail
    nothing here.
    """
    if not records or any(r.get("outcome") == "ok" for r in records):
        return ""
    errors = Counter(r.get("outcome", "?") for r in records)
    first = next((r["error"] for r in records if r.get("error")), "")
    return (f"no task succeeded at any site ({len(records)} tasks: "
            + ", ".join(f"{n} {k}" for k, n in errors.most_common())
            + (f"); first error: {first[:500]}" if first else ")"))


def _setup_logging(run_dir: Path, console: bool) -> list[logging.Handler]:
    """``log.txt`` (the stream: INFO, or DEBUG with ``$FLWR_HPC_VERBOSE``) and
    ``debug.txt`` (everything, for after the fact) for the ``flwr`` and ``flwr_hpc``
    loggers; with ``console``, flwr-hpc's lines also on stderr.
    """
    verbose = os.environ.get(ENV_VERBOSE, "") not in ("", "0")
    formatter = logging.Formatter(FILE_LOG_FORMAT, datefmt="%Y-%m-%dT%H:%M:%SZ")
    formatter.converter = time.gmtime
    handlers: list[logging.Handler] = []
    for name, level in (("log.txt", logging.DEBUG if verbose else logging.INFO),
                        ("debug.txt", logging.DEBUG)):
        handler = logging.FileHandler(run_dir / name)
        handler.setFormatter(formatter)
        handler.setLevel(level)
        handlers.append(handler)
    for name in ("flwr", "flwr_hpc"):
        lg = logging.getLogger(name)
        for handler in handlers:
            lg.addHandler(handler)
        lg.setLevel(logging.DEBUG)
    hpc = logging.getLogger("flwr_hpc")
    if console and not any(getattr(h, "_flwr_hpc_console", False) for h in hpc.handlers):
        ch = logging.StreamHandler(sys.stderr)
        ch.setFormatter(logging.Formatter(LOG_FORMAT))
        ch.setLevel(logging.DEBUG if verbose else logging.INFO)
        ch._flwr_hpc_console = True  # type: ignore[attr-defined]
        hpc.addHandler(ch)
        hpc.propagate = False
    return handlers


class _AppOutput(io.TextIOBase):
    """The ServerApp's stdout/stderr: each line goes to the run's log file as written
    (what ``flwr log`` / ``--stream`` show, as Flower copies a ServerApp's output into
    its run log) and on to the original stream.
    """

    def __init__(self, handlers: list[logging.Handler], passthrough: Any) -> None:
        self._handlers = [h for h in handlers if isinstance(h, logging.FileHandler)]
        self._passthrough = passthrough
        self._partial = ""
        self._lock = threading.Lock()

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        with self._lock:
            self._partial += text
            *lines, self._partial = self._partial.split("\n")
            if lines:
                self._emit("".join(f"{line}\n" for line in lines))
        try:
            self._passthrough.write(text)
        except (OSError, ValueError):  # a closed console must not fail the app
            pass
        return len(text)

    def flush(self) -> None:
        try:
            self._passthrough.flush()
        except (OSError, ValueError):
            pass

    def flush_line(self) -> None:
        """Write a last line that has no newline."""
        with self._lock:
            if self._partial:
                self._emit(self._partial + "\n")
                self._partial = ""

    def _emit(self, text: str) -> None:
        for handler in self._handlers:
            handler.acquire()
            try:
                stream = handler.stream
                if stream is not None:
                    stream.write(text)
                    stream.flush()
            finally:
                handler.release()


def execute_run(run_dir: Path, *, progress: Progress | None = None, console: bool = False,
                origin: str = "foreground") -> str:
    """Run the ServerApp of ``run_dir`` to the end; return the final status text. Raises
    :class:`RunnerBusy` (touching nothing) when another runner executes the run.
    ``origin`` (``foreground`` or ``service``) is recorded: a service restarted after a
    crash resumes its own runs by itself, a killed foreground run only on request.
    """
    lock = RunnerLock(run_dir)
    if not lock.acquire():
        holder = runner_holder(run_dir)
        raise RunnerBusy(f"run {run_dir.name} already has a runner ("
                         f"{holder.describe() if holder else '?'}); not starting a second one")
    try:
        update_status(run_dir, origin=origin, pid=os.getpid())
        return _execute_locked(run_dir, progress=progress, console=console)
    finally:
        lock.release()


def _execute_locked(run_dir: Path, *, progress: Progress | None, console: bool) -> str:
    from flwr.app import Context, RecordDict
    from flwr.common.config import get_fused_config_from_dir, get_project_config
    from flwr.server.run_serverapp import run as run_serverapp
    from flwr.supercore.run import Run, RunStatus
    from flwr.supercore.task_identity import TaskIdentity

    from flwr_hpc.fab import install_fab
    from flwr_hpc.server.grid import HPCGrid
    from flwr_hpc.server.wiring import make_grid

    handlers = _setup_logging(run_dir, console)
    if "glibc.malloc.mmap_max" not in os.environ.get("GLIBC_TUNABLES", ""):
        return_large_buffers()  # started without large_buffer_env: keep RSS = live memory
    os.environ.update(large_buffer_env())  # for the local site workers this run starts
    spec = json.loads((run_dir / "run.json").read_text())
    run_id = int(spec["run_id"])
    update_status(run_dir, status="starting", starting_at=now_iso())  # pid: execute_run
    grid: HPCGrid | None = None
    sub_status, details = "completed", ""
    try:
        fab_bytes = (run_dir / "app.fab").read_bytes()
        if sha256_hex(fab_bytes) != spec["fab_hash"]:
            raise RuntimeError(f"{run_dir / 'app.fab'} does not match its sha256; not running it")
        federation = read_federation(run_dir / "federation.json")
        home = flwr_home()
        app_dir = install_fab(fab_bytes, spec["fab_hash"], home)
        run_config = get_fused_config_from_dir(app_dir, spec["override_config"])
        server_app_attr = get_project_config(app_dir)["tool"]["flwr"]["app"]["components"][
            "serverapp"]

        TaskIdentity.run_id = run_id
        TaskIdentity.node_id = SUPERLINK_NODE_ID
        TaskIdentity.task_id = random.getrandbits(63)
        log.info("run %s: %s==%s on federation '%s' (%d sites, %d clients); run dir %s",
                 run_id, spec["fab_id"], spec["fab_version"], federation.name,
                 len(federation.sites), federation.num_clients, run_dir)
        if (done := checkpoint_round(run_dir)):
            log.info("run %s resumes after round %d (its last checkpoint)", run_id, done)
        grid = make_grid(federation, fab_bytes, run_dir=run_dir, flwr_home=home,
                                       run_config=run_config, progress=progress)
        _ACTIVE.update(grid=grid, run_dir=run_dir)
        run = Run.create_empty(run_id)
        run.fab_id, run.fab_version, run.fab_hash = (
            spec["fab_id"], spec["fab_version"], spec["fab_hash"])
        run.override_config = spec["override_config"]
        run.status = RunStatus("running", "", "")
        grid.set_run(run)
        context = Context(run_id=run_id, node_id=SUPERLINK_NODE_ID, node_config={},
                          state=RecordDict(), run_config=run_config)
        grid.warm_up()  # before the app's clock starts: its first timeout is the app's
        update_status(run_dir, status="running", running_at=now_iso())
        os.environ[ENV_RUN_DIR] = str(run_dir)
        # the ServerApp's own print()s belong to the run's log, as under Flower
        out, err = _AppOutput(handlers, sys.stdout), _AppOutput(handlers, sys.stderr)
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                run_serverapp(grid=grid, context=context, server_app_dir=str(app_dir),
                              server_app_attr=server_app_attr)
        finally:
            out.flush_line()
            err.flush_line()
        failure = no_task_succeeded(grid.task_log.records)
        if failure:  # the app ended normally, but nothing happened at any site
            raise RunFailed(failure)
        log.info("run %s finished; tasks: %s", run_id, run_dir / "tasks.jsonl")
    except (RunStopped, KeyboardInterrupt):
        sub_status, details = "stopped", "stopped by request"
        log.warning("run %s stopped by request", run_id)
    except (RunFailed, ConfigError) as err:  # the reason says it all: no traceback
        sub_status, details = "failed", str(err)
        log.error("run %s failed: %s", run_id, details)
    except BaseException as err:  # noqa: BLE001 - any failure ends the run as failed
        sub_status = "failed"
        details = f"{type(err).__name__}: {err}"
        log.error("run %s failed: %s\n%s", run_id, details, traceback.format_exc())
    finally:
        _ACTIVE.pop("grid", None)
        if grid is not None:
            grid.close()
        if (watchdog := _ACTIVE.pop("watchdog", None)) is not None:
            watchdog.cancel()  # the run ended in time; see exit_within_grace for the rest
        # a runner may run several runs in one process (tests, resume): the next one must
        # not find this run's directory as its own
        if os.environ.get(ENV_RUN_DIR) == str(run_dir):
            del os.environ[ENV_RUN_DIR]
        update_status(run_dir, status="finished", sub_status=sub_status, details=details,
                      finished_at=now_iso())
        for handler in handlers:
            handler.close()
            for name in ("flwr", "flwr_hpc"):
                logging.getLogger(name).removeHandler(handler)
    return f"finished:{sub_status}"


def main(argv: list[str] | None = None) -> int:
    """``python -m flwr_hpc.server.runner RUN_DIR``: execute the prepared run in
    ``RUN_DIR`` as a service runner; exit status 0 when it completed, 1 when it did not
    or another runner holds it, 2 on bad usage.
    """
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m flwr_hpc.server.runner RUN_DIR", file=sys.stderr)
        return 2
    os.umask(0o077)  # run files, stores and FAB installs are the owner's only
    keep_caches_under(flwr_home() / "hpc" / "cache")  # and its local sites' workers'
    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    try:
        status = execute_run(Path(args[0]), origin="service")
    except RunnerBusy as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    rc = 0 if status == "finished:completed" else 1
    exit_within_grace(rc)
    return rc


def exit_within_grace(rc: int) -> None:
    """Before a runner process exits: threads the ServerApp left behind (never joined,
    e.g. after a stop) must not keep it alive; past the grace period it exits anyway.
    """
    timer = threading.Timer(STOP_GRACE_S, lambda: (sys.stdout.flush(), sys.stderr.flush(),
                                                   os._exit(rc)))
    timer.daemon = True
    timer.start()


if __name__ == "__main__":
    sys.exit(main())
