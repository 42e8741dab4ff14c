"""Run records: the run directory, its status, and the lock that makes one runner *the*
runner of a run.

Everything about a run lives in its run directory (``$FLWR_HOME/hpc/runs/<run id>``)::

    run.json      what to run (FAB hash, overrides, federation)     -- written at start
    app.fab       the FAB bytes (sha256-verified before use)
    status.json   pending / starting / running / finished:{completed,failed,stopped}
    runner.lock   held by the runner executing the run (+ runner.lock.owner: its node,
                  pid and start time; see flwr_hpc.locks)
    log.txt       the run's log (what ``flwr log`` / ``--stream`` show)
    tasks.jsonl   one record per task (see ``flwr_hpc.server.telemetry``)
    checkpoint/   the last completed rounds (``flwr_hpc.strategy.checkpoint``), for resume

The runner writes these records; control (the CLI and the service) reads them and
creates new runs with :func:`prepare_run`. They live on the server side, with the runner
that owns them, so the runner never imports control.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from flwr_hpc.config import FederationConfig, dump_federation
from flwr_hpc.errors import FlwrHpcError
from flwr_hpc.locks import ExclusiveLock, Holder
from flwr_hpc.payload.objects import sha256_hex


def now_iso() -> str:
    """The current UTC time in ISO 8601 (run records' timestamps)."""
    return datetime.now(tz=UTC).isoformat()


def flwr_home() -> Path:
    """Flower's home directory (``$FLWR_HOME``, default ``~/.flwr``)."""
    from flwr.common.config import get_flwr_home

    return Path(get_flwr_home())


def runs_dir(home: Path | None = None) -> Path:
    """Where run directories live: ``<home>/hpc/runs`` (``home``: :func:`flwr_home`)."""
    return (home or flwr_home()) / "hpc" / "runs"


def new_run_id() -> int:
    """A random positive 63-bit run id with bit 40 set (never 0 or 1)."""
    return random.SystemRandom().getrandbits(63) | 1 << 40  # wide, positive, never 0/1


def _atomic_write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "w") as fh:
            json.dump(data, fh, indent=2, sort_keys=True)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:  # e.g. ENOSPC: the old file stays as it was, no temp file left
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def read_status(run_dir: Path) -> dict[str, Any]:
    """The run's ``status.json``; {} for anything that is not a readable run directory
    (a stray file in ``runs/``, a torn or foreign file).
    """
    try:
        status = json.loads((run_dir / "status.json").read_text())
    except (OSError, ValueError):
        return {}
    return status if isinstance(status, dict) else {}


def update_status(run_dir: Path, **fields: Any) -> dict[str, Any]:
    """Merge ``fields`` into the run's ``status.json`` (written atomically) and return
    the new status.
    """
    status = read_status(run_dir)
    status.update(fields)
    _atomic_write_json(run_dir / "status.json", status)
    return status


def prepare_run(
    fab_bytes: bytes,
    override_config: dict[str, Any],
    federation: FederationConfig,
    *,
    home: Path | None = None,
    run_id: int | None = None,
) -> Path:
    """Create the run directory of a new run (status ``pending``) and return it, private
    to the owner (0700). A FAB that is malformed, too large or names itself unsafely is
    refused (:class:`~flwr_hpc.fab.FabError`) before anything is written.
    """
    from flwr_hpc.fab import check_fab

    info = check_fab(fab_bytes)
    fab_id, fab_version = info.fab_id, info.version
    run_id = run_id or new_run_id()
    parent = runs_dir(home)
    parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    run_dir = parent / str(run_id)
    run_dir.mkdir(exist_ok=False, mode=0o700)
    fab_hash = sha256_hex(fab_bytes)
    (run_dir / "app.fab").write_bytes(fab_bytes)
    dump_federation(federation, run_dir / "federation.json")
    _atomic_write_json(run_dir / "run.json", {
        "run_id": run_id,
        "fab_hash": fab_hash,
        "fab_id": fab_id,
        "fab_version": fab_version,
        "override_config": override_config,
        "federation": federation.name,
    })
    update_status(run_dir, run_id=run_id, fab_id=fab_id, fab_version=fab_version,
                  fab_hash=fab_hash, override_config=override_config,
                  federation=federation.name, status="pending", sub_status="",
                  details="", pending_at=now_iso(), starting_at="", running_at="",
                  finished_at="")
    return run_dir


def checkpoint_round(run_dir: Path) -> int:
    """The last round checkpointed in ``run_dir`` (0: none)."""
    from flwr_hpc.strategy.checkpoint import CHECKPOINT_DIR

    latest = run_dir / CHECKPOINT_DIR / "LATEST"
    try:
        return int(latest.read_text().strip().split("-")[1])
    except (FileNotFoundError, IndexError, ValueError):
        return 0


def check_resumable(run_dir: Path) -> int:
    """Raise unless the run in ``run_dir`` can be resumed; return its checkpointed round."""
    status = read_status(run_dir)
    if not status or not (run_dir / "run.json").exists():
        raise FlwrHpcError(f"{run_dir} is not a flwr-hpc run directory")
    if status.get("status") == "finished" and status.get("sub_status") == "completed":
        raise FlwrHpcError(f"run {run_dir.name} already completed; nothing to resume")
    holder = runner_holder(run_dir)
    if holder is not None:
        raise RunnerBusy(f"run {run_dir.name} is still running (runner {holder.describe()}); "
                         "stop it first (flwr stop, on that node) or let it finish")
    return checkpoint_round(run_dir)


RUNNER_LOCK = "runner.lock"


class RunnerBusy(FlwrHpcError):
    """Another runner executes this run (it holds the run's lock)."""


class RunnerLock:
    """What makes a runner *the* runner of a run: an exclusive lock on
    ``<run dir>/runner.lock`` (:class:`flwr_hpc.locks.ExclusiveLock`: an ``flock`` where
    the filesystem has one, and an ``O_EXCL`` owner file naming the runner's node, pid and
    start time), held for as long as the run executes. A second runner -- a resume, a
    second service, a restart, on this login node or another sharing ``$HOME`` -- cannot
    start on the same run; a dead runner's lock on this node is taken over, one on
    another node is never guessed at.
    """

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / RUNNER_LOCK
        self._lock = ExclusiveLock(self.path)

    def acquire(self) -> bool:
        """Take the lock without waiting; False if another process holds it."""
        return self._lock.acquire(timeout=0)

    def release(self) -> None:
        """Give the lock back, if this object holds it."""
        self._lock.release()


def runner_holder(run_dir: Path) -> Holder | None:
    """The runner that holds the run's lock (node, pid, start time), or None when no
    runner executes the run.
    """
    return ExclusiveLock(run_dir / RUNNER_LOCK).holder()


def runner_holding(run_dir: Path) -> int | None:
    """The pid of the runner that holds the run's lock (0: unreadable), or None when no
    runner executes the run. Its node may be another: see :func:`runner_holder`.
    """
    holder = runner_holder(run_dir)
    return None if holder is None else holder.pid


