"""``flwr-hpc gc [--keep-runs N] [--dry-run]``: stores and run directories that do not grow
forever.

Payload stores are content-addressed and never delete by themselves: every round adds the
new global model at every site. (A client's update is written apart, under
``replies/``, and removed by the run once the strategy has used it.) What
can go:

* **store objects no live run can need.** An object is *used* whenever a run stages it or
  finds it already there (:meth:`FilesystemStore.has` and ``put`` refresh its mtime), so an
  object untouched since before the oldest live run started (a run whose runner holds its
  lock, on any node) and older than ``min_age_s`` is needed by no live run. A stopped or
  failed run needs none either: a resume restages from its checkpoint, which lives in
  the run directory. Temporary files of killed writers, quarantined objects and the
  updates of replies never collected (a run killed mid-round, a late result) older than
  ``min_age_s`` go too;
* **run directories** beyond the ``keep_runs`` most recently finished ones (only with
  ``--keep-runs``). Unfinished runs are never removed: they stay resumable.

The stores collected are every store this machine can reach, of every federation a run
directory or the service names: site stores on a filesystem (``filesystem``,
``shared-fs``, an inline site's reply directory) and the server's Transfer staging
directory. A Globus Transfer site's own directory is at the site: not reachable from here,
it is listed as skipped. The report's byte counts are what was removed (``--dry-run``:
what would be).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flwr_hpc.config import FederationConfig, read_federation
from flwr_hpc.server.runs import read_status, runner_holder, runs_dir
from flwr_hpc.server.sites import site_root


@dataclass
class GcReport:
    """What gc removed (or, dry, would remove): per location, files and bytes."""

    dry_run: bool
    removed: dict[str, tuple[int, int]] = field(default_factory=dict)  # where -> (n, bytes)
    runs_removed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    live_runs: list[str] = field(default_factory=list)
    cutoff: float = 0.0
    files: list[Path] = field(default_factory=list)  # store objects removed (if asked)

    @property
    def bytes(self) -> int:
        """Bytes removed in all, run directories included."""
        return sum(b for _, b in self.removed.values())

    def lines(self) -> list[str]:
        """The report as text."""
        verb = "would free" if self.dry_run else "freed"
        out = [f"{where}: {n} file(s), {b / 2**20:.1f} MiB"
               for where, (n, b) in sorted(self.removed.items())]
        out += [f"skipped {s}" for s in self.skipped]
        if self.live_runs:
            out.append(f"live runs (their objects kept): {', '.join(self.live_runs)}")
        out.append(f"gc {verb} {self.bytes / 2**20:.1f} MiB"
                   + (f", {len(self.runs_removed)} run director(y/ies)"
                      if self.runs_removed else ""))
        return out


def _federations(home: Path) -> dict[str, FederationConfig]:
    """Every federation a run directory or the service names, by name."""
    out: dict[str, FederationConfig] = {}
    paths = [home / "hpc" / "federation.json"]
    if runs_dir(home).is_dir():
        paths += sorted(runs_dir(home).glob("*/federation.json"))
    for path in paths:
        if path.is_file():
            try:
                fed = read_federation(path)
            except Exception:  # noqa: BLE001 - a torn record: its stores are left alone
                continue
            out.setdefault(fed.name, fed)
    return out


def store_dirs(home: Path) -> tuple[dict[str, Path], list[str]]:
    """``{label: store root}`` reachable from here, and the stores that are not."""
    dirs: dict[str, Path] = {}
    skipped: list[str] = []
    for fed in _federations(home).values():
        if fed.transfer.get("path"):
            dirs[f"{fed.name}: transfer staging"] = Path(fed.transfer["path"])
        for s in fed.sites:
            payload = s.payload
            label = f"{fed.name}/{s.name}"
            if payload["type"] == "globus-transfer":
                skipped.append(f"{label}: its Transfer directory is at the site")
            elif payload["type"] == "inline":
                if payload.get("path"):
                    dirs[f"{label} (replies)"] = Path(payload["path"])
            else:
                dirs[label] = (Path(payload["path"]) if payload.get("path")
                               else site_root(fed, s.name, home) / "store")
    return dirs, skipped


def _started(run_dir: Path) -> float:
    """When the run was created (its run.json), as an epoch time."""
    try:
        return (run_dir / "run.json").stat().st_mtime
    except OSError:
        return time.time()


def collect(home: Path, *, keep_runs: int | None = None, dry_run: bool = False,
            min_age_s: float = 3600.0, now: float | None = None,
            list_files: bool = False) -> GcReport:
    """Remove what no live run needs (see the module docstring); return the report
    (with ``list_files``, also every store object removed).
    """
    now = time.time() if now is None else now
    report = GcReport(dry_run=dry_run)
    runs = [d for d in sorted(runs_dir(home).glob("*")) if d.is_dir()] \
        if runs_dir(home).is_dir() else []
    live = [d for d in runs if runner_holder(d) is not None]
    report.live_runs = [d.name for d in live]
    report.cutoff = min([now - min_age_s] + [_started(d) for d in live])
    dirs, report.skipped = store_dirs(home)
    for label, root in dirs.items():
        n, nbytes = _collect_store(root, report.cutoff, dry_run,
                                   report.files if list_files else None)
        if n:
            report.removed[label] = (n, nbytes)
    if keep_runs is not None:
        finished = [d for d in runs if d not in live
                    and read_status(d).get("status") == "finished"]
        finished.sort(key=lambda d: (read_status(d).get("finished_at") or "", d.name),
                      reverse=True)
        for run_dir in finished[keep_runs:]:
            n, nbytes = _tree_size(run_dir)
            if not dry_run:
                shutil.rmtree(run_dir, ignore_errors=True)
            report.runs_removed.append(run_dir.name)
            report.removed[f"run {run_dir.name}"] = (n, nbytes)
    return report


def _collect_store(root: Path, cutoff: float, dry_run: bool,
                   files: list[Path] | None) -> tuple[int, int]:
    n = nbytes = 0
    # replies/: the objects of replies never collected (payload.reply_files.ReplyScope)
    for sub in ("objects", "quarantine", "replies"):
        base = root / sub
        if not base.is_dir():
            continue
        for path in base.rglob("*"):
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            if not path.is_file() or st.st_mtime >= cutoff:
                continue
            if not dry_run:
                try:  # a run may have used it since the scan began: look once more
                    if path.stat().st_mtime >= cutoff:
                        continue
                    path.unlink()
                except FileNotFoundError:
                    continue
            n, nbytes = n + 1, nbytes + st.st_size
            if files is not None:
                files.append(path)
    return n, nbytes


def _tree_size(root: Path) -> tuple[int, int]:
    n = nbytes = 0
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            n, nbytes = n + 1, nbytes + path.stat().st_size
    return n, nbytes


def report_json(report: GcReport) -> str:
    """The report as JSON (``--json``)."""
    data: dict[str, Any] = {
        "dry_run": report.dry_run, "bytes": report.bytes,
        "removed": {k: {"files": n, "bytes": b} for k, (n, b) in report.removed.items()},
        "runs_removed": report.runs_removed, "skipped": report.skipped,
        "live_runs": report.live_runs, "cutoff": report.cutoff}
    return json.dumps(data, indent=2, sort_keys=True)
