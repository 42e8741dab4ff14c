"""``flwr-hpc bench schedulers``: scheduler-aware strategies on simulated facilities.

Runs the LoRA job (this repository's Flower app: real ClientApps, the tiny model, the
bundled chemistry data) once per strategy on a simulated federation (default
``sim_4facilities``, see ``flwr_hpc/server/sim.py``) with the same seed, each for the same
virtual time budget, through the real runner. From each run's ``metrics.jsonl`` (central
eval loss per aggregation, with the virtual clock) and ``tasks.jsonl`` (every task's
simulated queue wait and run time) it reports, per strategy:

* ``time_to_target_s``: virtual seconds until the central eval loss first reaches the
  target (default: the final eval loss of the first strategy -- synchronous FedAvg --
  i.e. "how much sooner does it get where FedAvg ends"); ``null`` if never;
* ``final_eval_loss`` at the end of the budget;
* ``utilisation``: per site, the share of the run's virtual time it had a train task in
  flight (queued or running) rather than sitting idle waiting for other sites, and the
  mean over sites; ``compute_share``: the share spent running train tasks that came back.

Everything is decided by the seed: the same seed gives the same table.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from flwr_hpc.errors import FlwrHpcError

log = logging.getLogger("flwr_hpc")

DEFAULT_STRATEGIES = ("fedavg", "deadline", "fedbuff", "queue_aware")
LABELS = {"fedavg": "FedAvg (synchronous)", "deadline": "Deadline", "fedbuff": "Buffered async",
          "queue_aware": "Queue-aware"}
COLORS = {"fedavg": "#7f7f7f", "deadline": "#1f77b4", "fedbuff": "#2ca02c",
          "queue_aware": "#d62728"}
# Per-strategy settings of the benchmark (the strategy yaml files hold the defaults).
STRATEGY_OVERRIDES = {
    "fedavg": [],
    "deadline": ["strategy.quorum=0.5", "strategy.deadline_s=3600"],
    "fedbuff": ["strategy.buffer_size=2"],
    "queue_aware": [],
}


def app_dir() -> Path:
    """The repository (the Flower app the job runs): the parent of ``flwr_hpc/``."""
    root = Path(__file__).resolve().parents[2]
    if not (root / "pyproject.toml").exists() or not (root / "strategies").is_dir():
        raise FlwrHpcError(f"the LoRA app is not next to flwr_hpc ({root}); run the "
                           "benchmark from a clone of flwr-hpc (pip install -e .)")
    return root


def available_strategies() -> tuple[str, ...]:
    """The strategies the LoRA app can compose (its ``conf/strategy/*.yaml``)."""
    return tuple(sorted(p.stem for p in (app_dir() / "conf" / "strategy").glob("*.yaml")))


def job_overrides(strategy: str, *, hours: float, local_steps: int, seed: int,
                  max_rounds: int) -> str:
    """The Hydra overrides of one strategy's run: the time budget, local steps and seed,
    no federated evaluation, plus the strategy's own settings.
    """
    base = [f"strategy={strategy}", f"strategy.num_rounds={max_rounds}",
            f"strategy.time_budget_s={hours * 3600:g}",
            # synchronous FedAvg waits for every site (a failed job answers with an error)
            "strategy.round_timeout_s=604800",
            f"train.local_steps={local_steps}", f"train.seed={seed}",
            "evaluate.federated=false", "evaluate.max_generate=0"]
    return " ".join(base + STRATEGY_OVERRIDES.get(strategy, []))


def run_strategy(fab: bytes, strategy: str, federation: Any, *, hours: float,
                 local_steps: int, seed: int, max_rounds: int, home: Path) -> dict[str, Any]:
    """One run through the real runner; returns its curve and task records."""
    from flwr_hpc.server.runner import execute_run
    from flwr_hpc.server.runs import prepare_run

    overrides = job_overrides(strategy, hours=hours, local_steps=local_steps, seed=seed,
                              max_rounds=max_rounds)
    t0 = time.monotonic()
    run_dir = prepare_run(fab, {"overrides": overrides}, federation, home=home)
    status = execute_run(run_dir)
    wall = time.monotonic() - t0
    if status != "finished:completed":
        raise FlwrHpcError(f"strategy {strategy!r}: run {run_dir.name} ended {status}; "
                           f"see {run_dir / 'log.txt'}")
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    tasks = [json.loads(x) for x in (run_dir / "tasks.jsonl").read_text().splitlines()]
    return {"rows": rows, "tasks": tasks, "wall_s": wall, "overrides": overrides}


def utilisation(tasks: list[dict], sites: list[str], duration_s: float
                ) -> tuple[dict[str, float], dict[str, float]]:
    """Per site, over the run's ``duration_s``: the share of time it had a train task in
    flight (queued or running: the site is working for the federation rather than idle),
    and the share its compute spent running train tasks that came back.
    """
    spans: dict[str, list[tuple[float, float]]] = defaultdict(list)
    run: dict[str, float] = defaultdict(float)
    for t in tasks:
        if not t["phase"].startswith("train") or t.get("submitted_at") is None:
            continue
        start = float(t["submitted_at"])
        end = start + float(t.get("turnaround_s") or 0.0)
        spans[t["site"]].append((min(start, duration_s), min(end, duration_s)))
        if t["outcome"] == "ok" and t.get("run_s"):
            run[t["site"]] += float(t["run_s"])
    busy = {}
    for site in sites:
        covered, reach = 0.0, 0.0
        for a, b in sorted(spans[site]):  # union of the in-flight intervals
            a = max(a, reach)
            if b > a:
                covered += b - a
                reach = b
        busy[site] = covered / duration_s if duration_s > 0 else 0.0
    compute = {s: min(run[s] / duration_s, 1.0) if duration_s > 0 else 0.0 for s in sites}
    return busy, compute


def time_to_target(curve: list[tuple[float, float]], target: float) -> float | None:
    """The first time in ``curve`` (``(time, eval loss)`` points) at which the loss is at
    or below ``target``, or None if it never is.
    """
    for t, loss in curve:
        if loss is not None and loss <= target:
            return t
    return None


def summarize(name: str, run: dict[str, Any], sites: list[str]) -> dict[str, Any]:
    """One strategy's result row: its eval-loss curve over virtual time, final loss,
    aggregations, train tasks, and the sites' utilisation and compute share.
    """
    rows = run["rows"]
    curve = [(float(r["clock_s"]), float(r["eval_loss"])) for r in rows
             if r.get("eval_loss") is not None]
    duration = curve[-1][0] if curve else 0.0
    util, compute = utilisation(run["tasks"], sites, duration)
    train = [t for t in run["tasks"] if t["phase"].startswith("train")]
    return {
        "strategy": name,
        "curve": curve,
        "final_eval_loss": curve[-1][1] if curve else None,
        "virtual_duration_s": duration,
        "aggregations": max(len(rows) - 1, 0),
        "train_tasks": len(train),
        "train_tasks_ok": sum(t["outcome"] == "ok" for t in train),
        "utilisation": util,
        "mean_utilisation": sum(util.values()) / len(util) if util else 0.0,
        "compute_share": compute,
        "mean_compute_share": sum(compute.values()) / len(compute) if compute else 0.0,
        "wall_s": round(run["wall_s"], 1),
        "overrides": run["overrides"],
    }


def bench_schedulers(strategies: tuple[str, ...] = DEFAULT_STRATEGIES, *,
                     federation: str = "sim_4facilities", hours: float = 48.0,
                     local_steps: int = 10, seed: int = 0, max_rounds: int = 400,
                     target_loss: float | None = None, workdir: Path | None = None,
                     progress: Any = print) -> dict[str, Any]:
    """Run every strategy on the simulated federation; see the module docstring."""
    from flwr.cli.build import build_fab_from_disk

    from flwr_hpc.config import load_federation

    fed = load_federation([f"federation={federation}"])
    if not fed.is_simulated():
        raise FlwrHpcError(f"federation {federation!r} has non-simulated sites; the scheduler "
                           "benchmark needs compute.type 'sim' everywhere")
    fed = _reseed(fed, seed)
    fab = build_fab_from_disk(app_dir())
    sites = [s.name for s in fed.sites]
    own = workdir is None
    home = Path(tempfile.mkdtemp(prefix="flwr-hpc-bench-sched-")) if own else Path(workdir)
    results: dict[str, dict[str, Any]] = {}
    try:
        for name in strategies:
            progress(f"[bench schedulers] {name}: {hours:g} virtual hours on "
                     f"{len(sites)} simulated sites ...")
            run = run_strategy(fab, name, fed, hours=hours, local_steps=local_steps,
                               seed=seed, max_rounds=max_rounds, home=home)
            results[name] = summarize(name, run, sites)
            r = results[name]
            progress(f"[bench schedulers] {name}: final eval loss {r['final_eval_loss']:.4f} "
                     f"after {r['aggregations']} aggregations, {r['wall_s']:.0f} s real")
    finally:
        if own:
            shutil.rmtree(home, ignore_errors=True)
    baseline = strategies[0]
    target = target_loss if target_loss is not None else results[baseline]["final_eval_loss"]
    base_t = time_to_target(results[baseline]["curve"], target)
    for r in results.values():
        r["time_to_target_s"] = time_to_target(r["curve"], target)
        t = r["time_to_target_s"]
        r["time_saved_vs_baseline"] = (1 - t / base_t) if t is not None and base_t else None
        r["final_loss_vs_baseline"] = (r["final_eval_loss"] / results[baseline]["final_eval_loss"]
                                       - 1)
    scheduler_aware = [r for k, r in results.items() if k != baseline
                       and r["time_to_target_s"] is not None]
    best = min(scheduler_aware, key=lambda r: r["time_to_target_s"], default=None)
    return {
        "federation": federation,
        "seed": seed,
        "hours": hours,
        "local_steps": local_steps,
        "target_eval_loss": target,
        "baseline": baseline,
        "best": best["strategy"] if best else None,
        "sites": sites,
        "time_to_target_s": {k: r["time_to_target_s"] for k, r in results.items()},
        "final_eval_loss": {k: r["final_eval_loss"] for k, r in results.items()},
        "strategies": results,
    }


def _reseed(fed: Any, seed: int) -> Any:
    """The federation with every site's simulator seeded from ``seed`` (plus the site's own
    seed), so ``--seed`` changes queue draws and training together.
    """
    from flwr_hpc.config import FederationConfig

    raw = fed.to_dict()
    for site in raw["sites"].values():
        site["compute"]["sim"]["seed"] = int(site["compute"]["sim"]["seed"]) + int(seed)
    return FederationConfig.from_dict(raw, source=fed.source)


def format_table(result: dict[str, Any]) -> str:
    """The Markdown table of the README."""
    sites = result["sites"]
    head = ("| strategy | time to target (h) | vs FedAvg | final eval loss | aggregations | "
            "train tasks (ok) | compute share | busy: mean | " + " | ".join(sites) + " |")
    lines = [head, "|" + "---|" * (8 + len(sites))]
    for name, r in result["strategies"].items():
        t = r["time_to_target_s"]
        saved = r["time_saved_vs_baseline"]
        lines.append(
            f"| {LABELS.get(name, name)} | {'never' if t is None else f'{t / 3600:.1f}'} | "
            f"{'-' if name == result['baseline'] else ('-' if saved is None else f'{-saved:+.0%}')}"
            f" | {r['final_eval_loss']:.4f} | {r['aggregations']} | "
            f"{r['train_tasks']} ({r['train_tasks_ok']}) | {r['mean_compute_share']:.1%} | "
            f"{r['mean_utilisation']:.0%} | "
            + " | ".join(f"{r['utilisation'][s]:.0%}" for s in sites) + " |")
    lines.append("")
    lines.append(f"Target eval loss {result['target_eval_loss']:.4f} (FedAvg's final); "
                 f"{result['hours']:g} virtual hours per strategy, seed {result['seed']}, "
                 f"{result['local_steps']} local steps per task by default.")
    return "\n".join(lines) + "\n"


def figure(result: dict[str, Any], out_dir: Path) -> list[Path]:
    """Eval loss vs virtual time, one line per strategy, the target dashed
    (``schedulers.png`` and ``.svg`` through :mod:`flwr_hpc.plots`).
    """
    from flwr_hpc import plots

    fig, ax = plots.subplots(figsize=(7, 4))
    for k, r in result["strategies"].items():
        if r["curve"]:
            ax.plot([t / 3600 for t, _ in r["curve"]], [v for _, v in r["curve"]],
                    color=COLORS.get(k, "#000000"), linewidth=1.8, label=LABELS.get(k, k))
    ax.axhline(result["target_eval_loss"], color="black", linestyle="--", linewidth=1,
               label="target")
    ax.set(xlabel="virtual hours", ylabel="central eval loss",
           title=f"central eval loss vs virtual time ({result['federation']}, "
                 f"seed {result['seed']})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return plots.save(fig, out_dir, "schedulers")


def write_outputs(result: dict[str, Any], out_dir: Path) -> list[Path]:
    """Write ``schedulers.json``, ``.md`` (the table) and ``.png``/``.svg`` (the loss
    curves) into ``out_dir``; return their paths.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "schedulers.json", out_dir / "schedulers.md"]
    paths[0].write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    paths[1].write_text(format_table(result))
    return paths + figure(result, out_dir)


def _quiet() -> None:
    """The runs log every round; keep the benchmark's own lines readable."""
    if os.environ.get("FLWR_HPC_BENCH_VERBOSE"):
        return
    for name in ("flwr", "flwr_hpc"):  # each run's log.txt still gets everything
        for handler in logging.getLogger(name).handlers:
            if type(handler) is logging.StreamHandler:
                handler.setLevel(logging.WARNING)
