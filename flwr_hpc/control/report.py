"""``flwr-hpc report RUN_ID... [--out DIR]``: plots and a summary from run directories.

Reads each run's ``metrics.jsonl`` (one row per round, written by the LoRA job's
ServerApp) and ``tasks.jsonl`` (one record per task, written by the grid for any app) and
draws, with matplotlib:

* ``eval_vs_round`` -- eval loss (and the job's score, when there is one) per round, every
  run on the same axes;
* ``eval_vs_clock`` -- the same against the run's clock (seconds; virtual under the
  simulator), where scheduler-aware strategies differ;
* ``sites-<run>`` -- per round, the mean stage / queue / run / fetch seconds of each site's
  train tasks, stacked;
* ``bytes`` -- bytes to and from the sites per round, per run;
* ``failures`` -- tasks that did not end ``ok``, per site and run.

Each figure is written as PNG and SVG with fixed metadata (no dates, a fixed SVG hash
salt), so the same runs give byte-identical files. ``summary.md`` beside them gives, per
run, the rounds, first/final/best eval loss and score, wall time, bytes per direction and
failures per site, with the figures' file names.
"""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flwr_hpc.errors import FlwrHpcError

BREAKDOWN = ("stage_s", "queue_wait_s", "run_s", "fetch_s")


class ReportError(FlwrHpcError):
    """A run directory cannot be reported on (missing, or without records)."""


def _jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a torn last line of an interrupted run
            continue
    return rows


def load_run(run_dir: Path) -> dict[str, Any]:
    """A run's records: ``metrics`` rows, ``tasks`` records, its id and status."""
    if not run_dir.is_dir():
        raise ReportError(f"no run directory {run_dir}")
    metrics, tasks = _jsonl(run_dir / "metrics.jsonl"), _jsonl(run_dir / "tasks.jsonl")
    if not metrics and not tasks:
        raise ReportError(f"{run_dir}: neither metrics.jsonl nor tasks.jsonl has records")
    status = {}
    if (run_dir / "status.json").exists():
        status = json.loads((run_dir / "status.json").read_text())
    return {"id": run_dir.name, "dir": run_dir, "metrics": metrics, "tasks": tasks,
            "status": status}


def score_key(rows: Sequence[dict[str, Any]]) -> str | None:
    """``exact_match`` or ``accuracy``, whichever the rows carry."""
    for key in ("exact_match", "accuracy"):
        if any(r.get(key) is not None for r in rows):
            return key
    return None


def site_breakdown(tasks: Sequence[dict[str, Any]]) -> dict[str, dict[int, dict[str, float]]]:
    """``{site: {round: {field: mean seconds}}}`` over the ``ok`` train tasks."""
    acc: dict[str, dict[int, dict[str, list[float]]]] = defaultdict(
        lambda: defaultdict(lambda: defaultdict(list)))
    for t in tasks:
        if t.get("phase", "").split(".")[0] != "train" or t.get("outcome") != "ok":
            continue
        try:
            rnd = int(t["round"])
        except (TypeError, ValueError, KeyError):
            continue
        for field in BREAKDOWN:
            if isinstance(t.get(field), int | float):
                acc[t["site"]][rnd][field].append(float(t[field]))
    return {site: {rnd: {f: sum(v) / len(v) for f, v in fields.items()}
                   for rnd, fields in sorted(rounds.items())}
            for site, rounds in sorted(acc.items())}


def failures(tasks: Sequence[dict[str, Any]]) -> dict[str, int]:
    """Tasks that did not end ``ok``, per site (every site of the run listed)."""
    out: Counter[str] = Counter({t["site"]: 0 for t in tasks if "site" in t})
    for t in tasks:
        if t.get("outcome") != "ok" and "site" in t:
            out[t["site"]] += 1
    return dict(sorted(out.items()))


def write_report(run_dirs: Sequence[Path], out: Path) -> list[Path]:
    """The figures and ``summary.md`` for ``run_dirs``, written into ``out``."""
    from flwr_hpc import plots

    plt = plots.pyplot()
    runs = [load_run(Path(d)) for d in run_dirs]
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    with_metrics = [r for r in runs if r["metrics"]]
    for x_key, name, label in (("round", "eval_vs_round", "round"),
                               ("clock_s", "eval_vs_clock", "clock (s)")):
        if not with_metrics:
            break
        keys = [k for k in ("eval_loss", score_key([m for r in with_metrics
                                                    for m in r["metrics"]])) if k]
        fig, axes = plt.subplots(1, len(keys), figsize=(5.5 * len(keys), 4), squeeze=False)
        for ax, key in zip(axes[0], keys, strict=True):
            for r in with_metrics:
                pts = [(m[x_key], m[key]) for m in r["metrics"]
                       if m.get(x_key) is not None and m.get(key) is not None]
                if pts:
                    ax.plot(*zip(*pts, strict=True), marker="o", label=f"run {r['id']}")
            ax.set_xlabel(label)
            ax.set_ylabel(key)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        written += plots.save(fig, out, name)

    for r in runs:
        breakdown = site_breakdown(r["tasks"])
        if not breakdown:
            continue
        fig, axes = plt.subplots(1, len(breakdown), figsize=(4.5 * len(breakdown), 3.8),
                                 squeeze=False, sharey=True)
        for ax, (site, rounds) in zip(axes[0], breakdown.items(), strict=True):
            xs = list(rounds)
            bottom = [0.0] * len(xs)
            for field in BREAKDOWN:
                ys = [rounds[x].get(field, 0.0) for x in xs]
                ax.bar(xs, ys, bottom=bottom, label=field.removesuffix("_s"))
                bottom = [b + y for b, y in zip(bottom, ys, strict=True)]
            ax.set_title(site)
            ax.set_xlabel("round")
        axes[0][0].set_ylabel("seconds per train task (mean)")
        axes[0][-1].legend(fontsize=7)
        written += plots.save(fig, out, f"sites-{r['id']}")

    if with_metrics:
        fig, ax = plt.subplots(figsize=(6, 3.8))
        width = 0.8 / (2 * len(with_metrics))
        for i, r in enumerate(with_metrics):
            rows = [m for m in r["metrics"] if m.get("round", 0) > 0]
            xs = [m["round"] for m in rows]
            for j, key in enumerate(("bytes_sent", "bytes_received")):
                offset = (2 * i + j) * width - 0.4 + width / 2
                ax.bar([x + offset for x in xs], [m.get(key, 0) / 2**20 for m in rows],
                       width, label=f"run {r['id']} {key.split('_')[1]}")
        ax.set_xlabel("round")
        ax.set_ylabel("MiB")
        ax.legend(fontsize=7)
        written += plots.save(fig, out, "bytes")

    fail = {r["id"]: failures(r["tasks"]) for r in runs if r["tasks"]}
    if fail:
        sites = sorted({s for f in fail.values() for s in f})
        fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(sites)), 3.5))
        width = 0.8 / len(fail)
        for i, (run_id, per_site) in enumerate(fail.items()):
            ax.bar([k + i * width - 0.4 + width / 2 for k in range(len(sites))],
                   [per_site.get(s, 0) for s in sites], width, label=f"run {run_id}")
        ax.set_xticks(range(len(sites)), sites)
        ax.set_ylabel("tasks not ok")
        ax.legend(fontsize=7)
        written += plots.save(fig, out, "failures")

    summary = out / "summary.md"
    summary.write_text(summary_text(runs, [p.name for p in written if p.suffix == ".png"]))
    return [*written, summary]


def _f(value: Any) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else (
        f"{value:.4f}" if isinstance(value, float) else str(value))


def summary_text(runs: Sequence[dict[str, Any]], figures: Sequence[str]) -> str:
    """The markdown summary of ``runs`` (numbers straight from their records)."""
    lines = ["# flwr-hpc report", "", "| run | status | rounds | eval_loss first → final "
             "(best) | score final (best) | wall s | to sites | from sites | tasks not ok "
             "per site |", "|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        rows = r["metrics"]
        scored = [m for m in rows if m.get("eval_loss") is not None]
        loss = (f"{_f(scored[0]['eval_loss'])} → {_f(scored[-1]['eval_loss'])} "
                f"({_f(min(m['eval_loss'] for m in scored))})") if scored else "-"
        key = score_key(rows)
        with_score = [m for m in rows if key and m.get(key) is not None]
        score = (f"{key} {_f(with_score[-1][key])} ({_f(max(m[key] for m in with_score))})"
                 if with_score else "-")
        wall = sum(m.get("round_time_s") or 0.0 for m in rows)
        sent = sum(m.get("bytes_sent", 0) for m in rows) or sum(
            t.get("bytes_to_site") or 0 for t in r["tasks"])
        back = sum(m.get("bytes_received", 0) for m in rows) or sum(
            t.get("bytes_from_site") or 0 for t in r["tasks"])
        fail = ", ".join(f"{s} {n}" for s, n in failures(r["tasks"]).items()) or "-"
        status = "/".join(x for x in (r["status"].get("status"), r["status"].get("sub_status"))
                          if x) or "-"
        trained = max((m.get("round", 0) for m in rows), default=0)
        lines.append(f"| {r['id']} | {status} | {trained} | {loss} | {score} | {wall:.1f} | "
                     f"{sent} B | {back} B | {fail} |")
    lines += ["", "Figures: " + ", ".join(figures) + " (and .svg)", ""]
    return "\n".join(lines)
