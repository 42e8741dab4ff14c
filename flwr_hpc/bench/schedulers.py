"""``flwr-hpc bench schedulers``: scheduler-aware strategies on simulated facilities.

Runs the LoRA job (this repository's Flower app: real ClientApps, the tiny model, the
bundled chemistry data) once per strategy and seed on a simulated federation (default
``sim_4facilities``; ``sim_doe_traces`` replays real DOE queue traces; see
``flwr_hpc/server/sim.py``), every run for the same virtual time budget, through the real
runner (``--jobs`` runs in parallel processes). From each run's ``metrics.jsonl`` (central
eval loss per aggregation, with the virtual clock) and ``tasks.jsonl`` (every task's
simulated queue wait, run time and node-hours) it reports, per strategy, the mean and 95%
interval (Student t) over seeds of:

* ``time_to_target_s``: virtual seconds until the central eval loss first reaches the
  target -- by default the loss synchronous FedAvg (the first strategy) reaches in *every*
  seed, i.e. the worst of its final losses, so the target is reachable, fixed across
  seeds, and not tuned to any scheduler-aware strategy (``--target-loss`` sets it). A run
  that never reaches it counts as the whole budget (a lower bound; the table marks it);
* ``final_eval_loss`` at the end of the budget;
* ``node_hours``: the allocation charged -- run time x nodes of every task (queue time is
  free), and per aggregation;
* ``utilisation``: per site, the share of the run's virtual time it had a train task in
  flight (queued or running) rather than sitting idle waiting for other sites, and the
  mean over sites; ``compute_share``: the share spent running train tasks that came back.

Everything is decided by the seeds: the same seeds give the same table.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from flwr_hpc.errors import FlwrHpcError

log = logging.getLogger("flwr_hpc")

DEFAULT_STRATEGIES = ("fedavg", "fedqueue", "fedcompass", "fedasync", "fedbuff", "deadline",
                      "queue_aware", "budget_async")
BASELINES = ("fedqueue", "fedcompass")  # APPFL's: what "ours" is compared with
OURS = ("deadline", "queue_aware", "budget_async")  # flwr-hpc's (FedAsync, FedBuff: published)
LABELS = {"fedavg": "FedAvg (synchronous)", "deadline": "Deadline", "fedbuff": "FedBuff",
          "queue_aware": "Queue-aware", "fedasync": "FedAsync", "fedqueue": "FedQueue",
          "fedcompass": "FedCompass", "budget_async": "Budget-async (ours)"}
COLORS = {"fedavg": "#7f7f7f", "deadline": "#1f77b4", "fedbuff": "#2ca02c",
          "queue_aware": "#d62728", "fedasync": "#9467bd", "fedqueue": "#ff7f0e",
          "fedcompass": "#8c564b", "budget_async": "#e377c2"}
# Per-strategy settings of the benchmark (the strategy yaml files hold the defaults).
# Every strategy that sizes local work gets the same cap, 4x the default steps (FedQueue's
# budgets reach thousands of steps on these queues; APPFL sets no cap): the real ClientApps
# would otherwise spend the benchmark's real time on a few jobs.
STRATEGY_OVERRIDES = {
    "fedavg": [],
    "deadline": ["strategy.quorum=0.5", "strategy.deadline_s=3600"],
    "fedbuff": ["strategy.buffer_size=2"],
    "queue_aware": [],
    "fedasync": [],
    "fedqueue": ["strategy.max_steps={cap}"],
    "fedcompass": ["strategy.max_steps={cap}"],
    "budget_async": [],  # its own cap is 4x the default steps
}
EVAL_SAMPLES = 96
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
         9: 2.262, 10: 2.228, 15: 2.131, 20: 2.086, 30: 2.042}


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
            "evaluate.federated=false", "evaluate.max_generate=0",
            # central eval after every aggregation on a fixed seeded subset of the held-out
            # split (the async strategies aggregate ~100 times a virtual day)
            f"evaluate.max_samples={EVAL_SAMPLES}"]
    own = [x.format(cap=4 * local_steps) for x in STRATEGY_OVERRIDES.get(strategy, [])]
    return " ".join(base + own)


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
        if loss is not None and loss <= target + 1e-12:
            return t
    return None


def node_hours(tasks: list[dict]) -> float:
    """The allocation a run was charged: the sum of its tasks' ``node_hours`` (run time x
    nodes; queue time is free).
    """
    return float(sum(t.get("node_hours") or 0.0 for t in tasks))


def summarize(name: str, run: dict[str, Any], sites: list[str]) -> dict[str, Any]:
    """One run's result row: its eval-loss curve over virtual time, final loss,
    aggregations, train tasks, node-hours, and the sites' utilisation and compute share.
    """
    rows = run["rows"]
    curve = [(float(r["clock_s"]), float(r["eval_loss"])) for r in rows
             if r.get("eval_loss") is not None]
    duration = curve[-1][0] if curve else 0.0
    util, compute = utilisation(run["tasks"], sites, duration)
    train = [t for t in run["tasks"] if t["phase"].startswith("train")]
    aggregations = max(len(rows) - 1, 0)
    charged = node_hours(run["tasks"])
    return {
        "strategy": name,
        "curve": curve,
        "final_eval_loss": curve[-1][1] if curve else None,
        "virtual_duration_s": duration,
        "aggregations": aggregations,
        "train_tasks": len(train),
        "train_tasks_ok": sum(t["outcome"] == "ok" for t in train),
        "node_hours": round(charged, 6),
        "node_hours_per_aggregation": round(charged / aggregations, 6) if aggregations else None,
        "node_hours_by_site": {s: round(node_hours([t for t in run["tasks"]
                                                    if t["site"] == s]), 6) for s in sites},
        "utilisation": util,
        "mean_utilisation": sum(util.values()) / len(util) if util else 0.0,
        "compute_share": compute,
        "mean_compute_share": sum(compute.values()) / len(compute) if compute else 0.0,
        "wall_s": round(run["wall_s"], 1),
        "overrides": run["overrides"],
    }


def mean_ci(values: list[float]) -> dict[str, float | int | None]:
    """Mean and the half-width of its 95% interval (Student t; None for one value)."""
    n = len(values)
    if n == 0:
        return {"mean": None, "ci95": None, "n": 0}
    mean = sum(values) / n
    if n == 1:
        return {"mean": mean, "ci95": None, "n": 1}
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    t = T_975.get(n - 1) or T_975[max(k for k in T_975 if k <= n - 1)]
    return {"mean": mean, "ci95": t * sd / math.sqrt(n), "n": n}


def _one(args: dict[str, Any]) -> dict[str, Any]:
    """One (strategy, seed) run in its own process: its summary row."""
    import flwr.common.logger  # noqa: F401  (its console handler, to quieten)

    from flwr_hpc.config import load_federation

    _quiet()
    fed = _reseed(load_federation([f"federation={args['federation']}"]), args["seed"])
    home = Path(args["home"]) / f"{args['strategy']}-seed{args['seed']}"
    try:
        run = run_strategy(args["fab"], args["strategy"], fed, hours=args["hours"],
                           local_steps=args["local_steps"], seed=args["seed"],
                           max_rounds=args["max_rounds"], home=home)
    except FlwrHpcError as err:  # one failed run must not lose the others: reported
        return {"strategy": args["strategy"], "failed": str(err)}
    return summarize(args["strategy"], run, [s.name for s in fed.sites])


def bench_schedulers(strategies: tuple[str, ...] = DEFAULT_STRATEGIES, *,
                     federation: str = "sim_4facilities", hours: float = 48.0,
                     local_steps: int = 10, seeds: tuple[int, ...] = (0,), jobs: int = 1,
                     max_rounds: int = 400, target_loss: float | None = None,
                     target_round: int | None = None, workdir: Path | None = None,
                     progress: Any = print) -> dict[str, Any]:
    """Run every strategy for every seed on the simulated federation (``jobs`` runs at a
    time, each in its own process); see the module docstring.
    """
    from flwr_hpc.config import load_federation
    from flwr_hpc.fab import build_fab

    fed = load_federation([f"federation={federation}"])
    if not fed.is_simulated():
        raise FlwrHpcError(f"federation {federation!r} has non-simulated sites; the scheduler "
                           "benchmark needs compute.type 'sim' everywhere")
    if not seeds:
        raise FlwrHpcError("no seeds to run")
    fab = build_fab(app_dir())
    sites = [s.name for s in fed.sites]
    own = workdir is None
    home = Path(tempfile.mkdtemp(prefix="flwr-hpc-bench-sched-")) if own else Path(workdir)
    work = [{"fab": fab, "strategy": name, "seed": int(seed), "federation": federation,
             "hours": hours, "local_steps": local_steps, "max_rounds": max_rounds,
             "home": str(home)} for seed in seeds for name in strategies]
    runs: dict[str, dict[int, dict[str, Any]]] = {name: {} for name in strategies}
    progress(f"[bench schedulers] {len(work)} run(s): {len(strategies)} strategies x "
             f"{len(seeds)} seed(s), {hours:g} virtual hours each on {len(sites)} simulated "
             f"sites of {federation}, {jobs} at a time ...")
    try:
        if jobs <= 1:
            done = ((w, _one(w)) for w in work)
            _gather(done, runs, progress)
        else:
            import multiprocessing

            with ProcessPoolExecutor(max_workers=jobs,
                                     mp_context=multiprocessing.get_context("spawn")) as pool:
                futures = [(w, pool.submit(_one, w)) for w in work]
                _gather(((w, f.result()) for w, f in futures), runs, progress)
    finally:
        if own:
            shutil.rmtree(home, ignore_errors=True)
    return tabulate(runs, strategies=strategies, federation=federation, seeds=seeds,
                    hours=hours, local_steps=local_steps, sites=sites,
                    target_loss=target_loss, target_round=target_round)


def retabulate(saved: dict[str, Any], *, target_loss: float | None = None,
               target_round: int | None = None) -> dict[str, Any]:
    """:func:`tabulate` again on a saved result's runs (e.g. with another target)."""
    seeds = tuple(int(s) for s in saved["seeds"])
    runs = {k: {int(s): dict(r, curve=[tuple(p) for p in r["curve"]]) if "curve" in r else r
                for s, r in by_seed.items()} for k, by_seed in saved["runs"].items()}
    # the saved JSON's keys are sorted: the order (and so the baseline) is stored apart
    order = saved.get("strategies") or (
        [saved["baseline"]] + [k for k in DEFAULT_STRATEGIES if k in saved["table"]
                               and k != saved["baseline"]]
        + sorted(k for k in saved["table"] if k not in DEFAULT_STRATEGIES
                 and k != saved["baseline"]))
    return tabulate(runs, strategies=tuple(order), federation=saved["federation"],
                    seeds=seeds, hours=saved["hours"], local_steps=saved["local_steps"],
                    sites=saved["sites"], target_loss=target_loss, target_round=target_round)


def _gather(done: Any, runs: dict[str, dict[int, dict[str, Any]]], progress: Any) -> None:
    for w, row in done:
        runs[w["strategy"]][w["seed"]] = row
        if row.get("failed"):
            progress(f"[bench schedulers] {w['strategy']} seed {w['seed']}: FAILED: "
                     f"{row['failed']}")
            continue
        progress(f"[bench schedulers] {w['strategy']} seed {w['seed']}: final eval loss "
                 f"{row['final_eval_loss']:.4f} after {row['aggregations']} aggregations, "
                 f"{row['node_hours']:.0f} node-hours, {row['wall_s']:.0f} s real")


def tabulate(runs: dict[str, dict[int, dict[str, Any]]], *, strategies: tuple[str, ...],
             federation: str, seeds: tuple[int, ...], hours: float, local_steps: int,
             sites: list[str], target_loss: float | None = None,
             target_round: int | None = None) -> dict[str, Any]:
    """The benchmark's result from its runs (``runs[strategy][seed]`` = summary rows).

    The target: ``target_loss`` if given; else with ``target_round`` R the worst loss the
    baseline has after R aggregations over the seeds in which it got that far (a property
    of the learning problem -- what R synchronous rounds achieve -- not of any queue);
    else the worst final loss of the baseline over the seeds (reached in every seed).
    """
    baseline = strategies[0]
    rule = "given"
    if target_loss is None and target_round is not None:
        points = [runs[baseline][s]["curve"][target_round][1] for s in seeds
                  if not runs[baseline][s].get("failed")
                  and len(runs[baseline][s]["curve"]) > target_round]
        if not points:
            raise FlwrHpcError(f"{baseline} reached round {target_round} in no seed")
        target_loss = max(points)
        rule = (f"the worst eval loss of {baseline} after {target_round} rounds, over the "
                f"{len(points)} seeds that got there")
    if target_loss is None:  # what the baseline reaches in every seed
        finals = [runs[baseline][s]["final_eval_loss"] for s in seeds
                  if not runs[baseline][s].get("failed")]
        if not finals:
            raise FlwrHpcError(f"every run of the baseline {baseline!r} failed: no target")
        target_loss = max(finals)
        rule = f"the worst final eval loss of {baseline} over the seeds"
    budget = hours * 3600.0
    table: dict[str, dict[str, Any]] = {}
    for name in strategies:
        failed = [s for s in seeds if runs[name][s].get("failed")]
        rows = [runs[name][s] for s in seeds if s not in failed]
        times = [time_to_target(r["curve"], target_loss) for r in rows]
        for r, t in zip(rows, times, strict=True):
            r["time_to_target_s"] = t
        table[name] = {
            # a failed run never reached the target: the whole budget, as for censored runs
            "time_to_target_s": mean_ci([budget if t is None else t for t in times]
                                        + [budget] * len(failed)),
            "failed": len(failed),
            "reached": sum(t is not None for t in times),
            "final_eval_loss": mean_ci([r["final_eval_loss"] for r in rows]),
            "node_hours": mean_ci([r["node_hours"] for r in rows]),
            "node_hours_per_aggregation": mean_ci([r["node_hours_per_aggregation"] or 0.0
                                                   for r in rows]),
            "aggregations": mean_ci([float(r["aggregations"]) for r in rows]),
            "mean_utilisation": mean_ci([r["mean_utilisation"] for r in rows]),
            "mean_compute_share": mean_ci([r["mean_compute_share"] for r in rows]),
        }
    ours = [k for k in strategies if k in OURS]
    best = min(ours, key=lambda k: table[k]["time_to_target_s"]["mean"], default=None)
    versus: dict[str, Any] = {}
    if best is not None:
        for b in BASELINES:
            if b in table:
                tb, tours = (table[b]["time_to_target_s"]["mean"],
                             table[best]["time_to_target_s"]["mean"])
                versus[b] = {
                    "time_saved": 1 - tours / tb if tb else None,
                    "final_loss_vs": (table[best]["final_eval_loss"]["mean"]
                                      / table[b]["final_eval_loss"]["mean"] - 1),
                    "node_hours_vs": (table[best]["node_hours"]["mean"]
                                      / table[b]["node_hours"]["mean"] - 1)
                    if table[b]["node_hours"]["mean"] else None}
    return {
        "federation": federation, "strategies": list(strategies), "seeds": list(seeds),
        "hours": hours,
        "local_steps": local_steps, "target_eval_loss": target_loss, "target_rule": rule,
        "baseline": baseline, "sites": sites, "best": best, "versus": versus,
        "table": table, "runs": {k: {str(s): v for s, v in r.items()} for k, r in runs.items()},
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


def _pm(stat: dict[str, Any], fmt: str, scale: float = 1.0) -> str:
    if stat["mean"] is None:
        return "-"
    text = format(stat["mean"] / scale, fmt)
    return text if stat["ci95"] is None else f"{text} ± {format(stat['ci95'] / scale, fmt)}"


def format_table(result: dict[str, Any]) -> str:
    """The Markdown table of the README."""
    lines = ["| strategy | time to target (h) | reached | final eval loss | node-hours | "
             "node-h / aggregation | aggregations | busy (mean of sites) |",
             "|---|---|---|---|---|---|---|---|"]
    n = len(result["seeds"])
    for name, t in result["table"].items():
        censored = "≥ " if t["reached"] < n else ""
        failed = f" ({t['failed']} failed)" if t.get("failed") else ""
        lines.append(
            f"| {LABELS.get(name, name)} | {censored}{_pm(t['time_to_target_s'], '.1f', 3600)}"
            f" | {t['reached']}/{n}{failed} | {_pm(t['final_eval_loss'], '.4f')} | "
            f"{_pm(t['node_hours'], '.0f')} | {_pm(t['node_hours_per_aggregation'], '.1f')} | "
            f"{_pm(t['aggregations'], '.0f')} | {_pm(t['mean_utilisation'], '.0%')} |")
    lines.append("")
    lines.append(f"Mean ± 95% interval over seeds {result['seeds']}; target eval loss "
                 f"{result['target_eval_loss']:.4f} ({result['target_rule']}); a run that "
                 f"never reaches it counts as the whole budget (≥); {result['hours']:g} "
                 f"virtual hours per run on {result['federation']}, "
                 f"{result['local_steps']} local steps per task by default.")
    for b, v in result["versus"].items():
        if v["time_saved"] is not None:
            lines.append(f"{LABELS.get(result['best'], result['best'])} vs "
                         f"{LABELS.get(b, b)}: {v['time_saved']:+.0%} time to target saved, "
                         f"final loss {v['final_loss_vs']:+.1%}, node-hours "
                         f"{(v['node_hours_vs'] or 0):+.0%}.")
    return "\n".join(lines) + "\n"


def mean_curve(curves: list[list[tuple[float, float]]], grid: list[float]) -> list[float]:
    """The mean over runs of each run's last eval loss at or before each time of ``grid``
    (a step function; a run's first point holds before it).
    """
    out = []
    for t in grid:
        vals = []
        for c in curves:
            prev = [loss for tt, loss in c if tt <= t]
            vals.append(prev[-1] if prev else c[0][1])
        out.append(sum(vals) / len(vals))
    return out


def figure(result: dict[str, Any], out_dir: Path, name: str = "schedulers") -> list[Path]:
    """Mean eval loss over seeds vs virtual time, one line per strategy, the target dashed
    (``<name>.png`` and ``.svg`` through :mod:`flwr_hpc.plots`).
    """
    from flwr_hpc import plots

    fig, ax = plots.subplots(figsize=(7, 4))
    grid = [result["hours"] * 3600 * i / 200 for i in range(201)]
    for k, runs in result["runs"].items():
        curves = [r["curve"] for r in runs.values() if r.get("curve")]
        if curves:
            ax.plot([t / 3600 for t in grid], mean_curve(curves, grid),
                    color=COLORS.get(k, "#000000"), linewidth=1.8, label=LABELS.get(k, k))
    ax.axhline(result["target_eval_loss"], color="black", linestyle="--", linewidth=1,
               label="target")
    ax.set(xlabel="virtual hours", ylabel="central eval loss (mean over seeds)",
           title=f"central eval loss vs virtual time ({result['federation']}, "
                 f"{len(result['seeds'])} seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return plots.save(fig, out_dir, name)


def write_outputs(result: dict[str, Any], out_dir: Path, name: str = "schedulers"
                  ) -> list[Path]:
    """Write ``<name>.json``, ``.md`` (the table) and ``.png``/``.svg`` (the loss curves)
    into ``out_dir``; return their paths.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{name}.json", out_dir / f"{name}.md"]
    paths[0].write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    paths[1].write_text(format_table(result))
    return paths + figure(result, out_dir, name)


def _quiet() -> None:
    """The runs log every round; keep the benchmark's own lines readable."""
    if os.environ.get("FLWR_HPC_BENCH_VERBOSE"):
        return
    for name in ("flwr", "flwr_hpc"):  # each run's log.txt still gets everything
        for handler in logging.getLogger(name).handlers:
            if (isinstance(handler, logging.StreamHandler)
                    and not isinstance(handler, logging.FileHandler)):
                handler.setLevel(logging.WARNING)
