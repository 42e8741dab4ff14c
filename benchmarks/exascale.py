"""The exascale study, reproduced in miniature.

    python benchmarks/exascale.py [--part comm accuracy tables] [--quick] [--out DIR]
    python benchmarks/exascale.py --part comm --only BERT-base/full/96   # one point, merged

Reproduces, on this machine's local federation, the findings of "Scalable Federated
Learning for Scientific Foundation Models on Leadership-Class Systems" (EuroMLSys 2026:
up to 96 clients; ALBERT, BERT, DeBERTa; FedAvg/FedProx/FedOpt; heterogeneity, dropout,
DP):

* ``comm`` -- Figure 1a: communication time per round vs clients (2, 8, 32, 96) for
  ALBERT-, BERT- and DeBERTa-**base-sized** architectures (albert-base-v2, bert-base-uncased,
  deberta-v3-base configs, built on the meta device: communication does not care about
  the weights), exchanging the full model and exchanging the LoRA adapters the job trains
  (r 8 on the attention query/value projections, plus the classifier head). Each point is
  ``flwr-hpc bench transport`` (no training: the round is pure communication) with that
  model's tensor layout, median round after the warm-up round; a linear fit (slope,
  intercept, R^2) per model and exchange. A point whose round would need more scratch
  disk than is free (each round's model at 4 sites, and at most a round's replies: a
  reply leaves the store once added) is not run and says so.
* ``accuracy`` -- Figure 1b: central test accuracy after training vs clients (2, 4, 8,
  16) on the chemistry classification task (molecular weight >= 200 Da), for the real
  MiniLM weights and the tiny ALBERT/BERT/DeBERTa configs, each point the mean over
  FedAvg, FedProx and FedAdam and over IID and Dirichlet(0.1) label-skew partitions, with
  the spread (std, min, max). The data set is fixed and split among the clients, and each
  client makes about one local epoch per round (``ceil(360 / clients / batch)`` steps),
  so the total compute per round is the same at every client count, as in the study.
* ``convergence`` -- accuracy by round over longer runs (MiniLM, FedAvg, IID, 2 and 16
  clients, ``--long-rounds`` rounds): whether fewer local steps per client only delay
  the accuracy the fewest clients reach, or cap it.
* ``tables`` -- final accuracy (MiniLM, FedAvg, 4 clients, 10 rounds: a setting whose
  baseline learns, so that costs can show) under heterogeneity (Dirichlet
  alpha inf / 1.0 / 0.1 over labels), client dropout (per-round probability 0 / 0.1 /
  0.3 that a client's task is lost, ``faults.dropout``: NODE_UNAVAILABLE like a real
  loss) and DP (none / DP-SGD epsilon 8 / epsilon 2, Opacus, delta 1e-5).

Writes ``exascale.json`` and ``exascale.md`` (tables + the study's claims next to what we
measured) and the two figures (``exascale_comm``, ``exascale_accuracy``; PNG and SVG, via
:mod:`flwr_hpc.plots`) into ``--out``. ``--quick`` is the 2-point miniature the tests run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

MiB = 2**20
TRAIN_ROWS = 360  # property_prediction-mw rows in the bundled train split

# base-sized architectures, as published (transformers configs; random init on meta)
ARCHS: dict[str, tuple[str, dict[str, Any], list[str]]] = {
    "ALBERT-base": ("albert", {"vocab_size": 30000, "embedding_size": 128, "hidden_size": 768,
                               "num_hidden_layers": 12, "num_attention_heads": 12,
                               "intermediate_size": 3072}, ["query", "value"]),
    "BERT-base": ("bert", {}, ["query", "value"]),  # BertConfig() is bert-base-uncased
    "DeBERTa-base": ("deberta-v2", {"vocab_size": 128100, "hidden_size": 768,
                                    "num_hidden_layers": 12, "num_attention_heads": 12,
                                    "intermediate_size": 3072, "relative_attention": True,
                                    "position_buckets": 256, "norm_rel_ebd": "layer_norm",
                                    "share_att_key": True, "pos_att_type": ["p2c", "c2p"],
                                    "max_relative_positions": -1, "type_vocab_size": 0,
                                    "position_biased_input": False},
                     ["query_proj", "value_proj"]),
}
ACC_MODELS = ("minilm", "tiny_albert", "tiny_bert", "tiny_deberta")
STRATEGIES = ("fedavg", "fedprox", "fedadam")
PARTITIONS = (("iid", None), ("dirichlet", 0.1))


def _say(text: str) -> None:
    print(f"[exascale {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- Figure 1a


def layout(arch: str, exchange: str) -> list[int]:
    """Float32 element counts of the tensors a client exchanges: every parameter of the
    base-sized sequence classifier (``full``), or the trainable ones after LoRA
    (``lora``: r 8, alpha 16 on ``ARCHS[arch][2]``, plus the classifier head)."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from client_apps import lora

    kind, kwargs, targets = ARCHS[arch]
    cfg = AutoConfig.for_model(kind, num_labels=2, **kwargs)
    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(cfg)
        if exchange == "full":
            return [p.numel() for p in model.state_dict().values()]
        peft_model = lora.apply_lora(model, {"task": "sequence_classification", "lora": {
            "r": 8, "alpha": 16, "dropout": 0.0, "target_modules": targets}})
        return [p.numel() for p in peft_model.parameters() if p.requires_grad]


def linear_fit(xs: list[float], ys: list[float]) -> dict[str, float]:
    """Least-squares ``y = slope * x + intercept`` and its R^2."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
    intercept = my - slope * mx
    ss_res = sum((y - slope * x - intercept) ** 2 for x, y in zip(xs, ys, strict=True))
    ss_tot = sum((y - my) ** 2 for y in ys)
    return {"slope_s_per_client": slope, "intercept_s": intercept,
            "r2": 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0}


def comm_study(clients: list[int], archs: list[str], rounds: int, workdir: Path,
               only: set[tuple[str, str, int]] | None = None,
               earlier: dict[str, Any] | None = None) -> dict[str, Any]:
    """Part (a); ``only``: run just these (model, exchange, clients) points and keep the
    other points of ``earlier`` (a previous result's ``comm``), refitting every line.
    """
    from flwr_hpc.bench.transport import bench_transport

    points: list[dict[str, Any]] = []
    fits: dict[str, Any] = {}
    sizes: dict[str, Any] = {}
    kept = {(p["model"], p["exchange"], p["clients"]): p
            for p in (earlier or {}).get("points", [])} if only else {}
    for arch in archs:
        for exchange in ("full", "lora"):
            tensors = layout(arch, exchange)
            nbytes = 4 * sum(tensors)
            sizes[f"{arch}/{exchange}"] = {"params": sum(tensors), "tensors": len(tensors),
                                           "mb": round(nbytes / MiB, 3)}
            for n in clients:
                if only and (arch, exchange, n) not in only:
                    if (arch, exchange, n) in kept:
                        points.append(kept[(arch, exchange, n)])
                    continue
                point: dict[str, Any] = {"model": arch, "exchange": exchange, "clients": n,
                                         "mb_per_client": round(nbytes / MiB, 3)}
                # a site store keeps each round's model (4 sites) and the replies not
                # yet added (removed once used: at most a round's, if the server lags)
                need = int(1.15 * nbytes * (n + 4 * (rounds + 1)))
                free = shutil.disk_usage(workdir).free
                if need > free:
                    point["skipped"] = (f"needs ~{need / 2**30:.0f} GiB of scratch disk, "
                                        f"{free / 2**30:.0f} GiB free")
                    _say(f"{arch} {exchange} n={n}: skipped ({point['skipped']})")
                    points.append(point)
                    continue
                t0 = time.monotonic()
                res = bench_transport(n, 0.0, rounds, flower=False, tensors=tensors,
                                      workdir=workdir / f"comm-{arch}-{exchange}-{n}")
                shutil.rmtree(workdir / f"comm-{arch}-{exchange}-{n}", ignore_errors=True)
                point.update(round_s=round(res["flwr_hpc_round_s"], 4),
                             rounds_s=[round(x, 4) for x in res["flwr_hpc_rounds_s"]],
                             floor_round_s=round(res["floor_round_s"], 4))
                # (no server RSS here: a runner forked from this process, which holds
                # torch and the layouts, starts with this process's peak counted)
                _say(f"{arch} {exchange} n={n}: {point['round_s']:.3f} s/round "
                     f"({time.monotonic() - t0:.0f} s)")
                points.append(point)
            done = [p for p in points if p["model"] == arch and p["exchange"] == exchange
                    and "round_s" in p]
            if len(done) >= 2:
                fits[f"{arch}/{exchange}"] = {
                    k: round(v, 5) for k, v in linear_fit([p["clients"] for p in done],
                                                          [p["round_s"] for p in done]).items()}
                fits[f"{arch}/{exchange}"]["points"] = len(done)
    return {"clients": clients, "rounds": rounds, "sizes": sizes, "points": points,
            "fits": fits}


# ----------------------------------------------------------------------------- runs


def local_steps(clients: int, batch: int, epochs: float = 1.0) -> int:
    """About ``epochs`` local epochs over a client's share of the fixed data set."""
    return max(1, math.ceil(epochs * TRAIN_ROWS / clients / batch))


_RUNS: dict[tuple, dict[str, Any]] = {}  # the same run asked for twice runs once


def run_job(workdir: Path, *, model: str, clients: int, strategy: str = "fedavg",
            partitioner: str = "iid", alpha: float | None = None, rounds: int,
            batch: int, dropout: float = 0.0, epsilon: float | None = None,
            seed: int = 0) -> dict[str, Any]:
    """One federated run through flwr-hpc's runner on a one-site local federation of
    ``clients`` clients; returns its final and per-round central accuracy."""
    key = (str(workdir), model, clients, strategy, partitioner, alpha, rounds, batch,
           dropout, epsilon, seed)
    if key not in _RUNS:
        _RUNS[key] = _run_job(workdir, model=model, clients=clients, strategy=strategy,
                              partitioner=partitioner, alpha=alpha, rounds=rounds,
                              batch=batch, dropout=dropout, epsilon=epsilon, seed=seed)
    return _RUNS[key]


def _run_job(workdir: Path, *, model: str, clients: int, strategy: str, partitioner: str,
             alpha: float | None, rounds: int, batch: int, dropout: float,
             epsilon: float | None, seed: int) -> dict[str, Any]:
    from flwr_hpc.config import load_federation
    from flwr_hpc.fab import build_fab
    from flwr_hpc.server.runner import execute_run
    from flwr_hpc.server.runs import prepare_run

    fed_overrides = [f"federation.sites.alpha.clients={clients}",
                     "federation.sites.alpha.compute.workers=2",
                     "~federation.sites.beta", "~federation.sites.gamma"]
    if dropout:
        fed_overrides += [f"federation.sites.alpha.faults.dropout={dropout}",
                          f"federation.sites.alpha.faults.seed={seed}"]
    job = [f"model={model}", f"strategy={strategy}", f"data.partitioner={partitioner}",
           f"train.batch_size={batch}", f"train.seed={seed}", "evaluate.federated=false",
           # a lost client must not stop the round (the study's dropout keeps training)
           "strategy.min_train_nodes=1", "strategy.min_available_nodes=1"]
    if alpha is not None:
        job.append(f"data.alpha={alpha}")
    if epsilon is not None:
        job += ["dp=opacus", "dp.noise_multiplier=null", f"dp.target_epsilon={epsilon}"]
    steps = local_steps(clients, batch)
    home = workdir / "home"
    os.environ["FLWR_HOME"] = str(home)
    run_config = {"overrides": " ".join(job), "num-server-rounds": rounds,
                  "local-steps": steps}
    t0 = time.monotonic()
    run_dir = prepare_run(build_fab(REPO), run_config, load_federation(fed_overrides))
    status = execute_run(run_dir)
    if status != "finished:completed":
        raise SystemExit(f"run {run_config} {status}: see {run_dir / 'log.txt'}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    tasks = [json.loads(line) for line in (run_dir / "tasks.jsonl").read_text().splitlines()]
    out = {"accuracy": rows[-1]["accuracy"], "eval_loss": round(rows[-1]["eval_loss"], 4),
           "accuracy_by_round": [r["accuracy"] for r in rows], "local_steps": steps,
           "lost_tasks": sum(t.get("outcome") != "ok" for t in tasks
                             if str(t.get("phase", "")).startswith("train")),
           "epsilon_spent": rows[-1].get("epsilon"), "wall_s": round(time.monotonic() - t0, 1)}
    shutil.rmtree(run_dir, ignore_errors=True)
    return out


def _spread(values: list[float]) -> dict[str, float]:
    return {"mean": round(statistics.fmean(values), 4),
            "std": round(statistics.pstdev(values), 4),
            "min": min(values), "max": max(values), "n": len(values)}


def accuracy_study(models: list[str], clients: list[int], rounds: int, batch: int,
                   workdir: Path, strategies: tuple[str, ...] = STRATEGIES) -> dict[str, Any]:
    runs, summary = [], {}
    for model in models:
        summary[model] = {}
        for n in clients:
            accs = []
            for strategy in strategies:
                for partitioner, alpha in PARTITIONS:
                    r = run_job(workdir, model=model, clients=n, strategy=strategy,
                                partitioner=partitioner, alpha=alpha, rounds=rounds,
                                batch=batch)
                    runs.append({"model": model, "clients": n, "strategy": strategy,
                                 "partition": partitioner if alpha is None
                                 else f"dirichlet({alpha})", **r})
                    accs.append(r["accuracy"])
                    _say(f"{model} n={n} {strategy} {runs[-1]['partition']}: accuracy "
                         f"{r['accuracy']:.3f} ({r['wall_s']:.0f} s)")
            summary[model][str(n)] = _spread(accs)
        means = [summary[model][str(n)]["mean"] for n in clients]
        stds = [summary[model][str(n)]["std"] for n in clients]
        summary[model]["range_of_means"] = round(max(means) - min(means), 4)
        summary[model]["mean_within_std"] = round(statistics.fmean(stds), 4)
    return {"clients": clients, "rounds": rounds, "batch": batch, "runs": runs,
            "strategies": list(strategies), "summary": summary}


def tables_study(model: str, clients: int, rounds: int, batch: int, workdir: Path,
                 *, alphas=(None, 1.0, 0.1), dropouts=(0.0, 0.1, 0.3),
                 epsilons=(None, 8.0, 2.0)) -> dict[str, Any]:
    def run(alpha=None, dropout=0.0, epsilon=None):
        r = run_job(workdir, model=model, clients=clients,
                    partitioner="iid" if alpha is None else "dirichlet", alpha=alpha,
                    rounds=rounds, batch=batch, dropout=dropout, epsilon=epsilon)
        _say(f"tables alpha={alpha} dropout={dropout} epsilon={epsilon}: accuracy "
             f"{r['accuracy']:.3f}")
        return r

    het = [{"alpha": "inf (iid)" if a is None else a, **run(alpha=a)} for a in alphas]
    drop = [{"dropout": p, **run(dropout=p)} for p in dropouts]
    dp = [{"epsilon": "none" if e is None else e, **run(epsilon=e)} for e in epsilons]
    return {"model": model, "clients": clients, "rounds": rounds, "batch": batch,
            "heterogeneity": het, "dropout": drop, "dp": dp}


def convergence_study(model: str, clients: list[int], rounds: int, batch: int,
                      workdir: Path) -> dict[str, Any]:
    """Accuracy by round over a longer run (FedAvg, IID): whether the fewest and the most
    clients end at the same accuracy once both have had the rounds they need."""
    runs = []
    for n in clients:
        r = run_job(workdir, model=model, clients=n, rounds=rounds, batch=batch)
        runs.append({"clients": n, **r})
        _say(f"convergence {model} n={n}: accuracy by round {r['accuracy_by_round']}")
    return {"model": model, "rounds": rounds, "batch": batch, "runs": runs}


# ----------------------------------------------------------------------------- outputs


PLATEAU_ROUNDS = 10  # accuracy on 40 molecules moves 2.5 points a molecule: average a tail


def plateau(accuracy_by_round: list[float], rounds: int = PLATEAU_ROUNDS) -> float:
    """Mean accuracy over the last ``rounds`` rounds (all of them if fewer)."""
    tail = accuracy_by_round[-rounds:]
    return round(statistics.fmean(tail), 4)


def claims(result: dict[str, Any]) -> list[str]:
    """The study's three claims, each next to what this run measured."""
    out = []
    comm = result.get("comm")
    if comm:
        fits = comm["fits"]
        full = {k.split("/")[0]: v for k, v in fits.items() if k.endswith("/full")}
        r2 = ", ".join(f"{m} {v['r2']:.3f}" for m, v in full.items())
        order = sorted(full, key=lambda m: comm["sizes"][f"{m}/full"]["mb"])
        slopes = [full[m]["slope_s_per_client"] for m in order]
        ordered = all(a < b for a, b in zip(slopes, slopes[1:], strict=False))
        lin = all(v["r2"] >= 0.95 for v in full.values())
        lora = {k.split("/")[0]: v for k, v in fits.items() if k.endswith("/lora")}
        out.append(
            "1. *Communication time per round grows linearly with the number of clients, "
            "in proportion to model size.* "
            f"Measured (full model): R^2 {r2} -- {'linear' if lin else 'NOT linear'} "
            "(criterion R^2 >= 0.95); slopes "
            + ", ".join(f"{m} {full[m]['slope_s_per_client'] * 1000:.1f} ms/client "
                        f"({comm['sizes'][f'{m}/full']['mb']:.0f} MB)" for m in order)
            + f" -- {'ordered' if ordered else 'NOT ordered'} by model size. LoRA adapters: "
            + ", ".join(f"{m} {v['slope_s_per_client'] * 1000:.1f} ms/client "
                        f"(R^2 {v['r2']:.2f}, {comm['sizes'][f'{m}/lora']['mb']:.2f} MB)"
                        for m, v in lora.items())
            + ": per-task overhead, not bytes, sets their cost.")
    acc = result.get("accuracy")
    if acc:
        parts = []
        for model, s in acc["summary"].items():
            stable = s["range_of_means"] <= max(s["mean_within_std"], 0.05)
            means = ", ".join(str(s[str(n)]["mean"]) for n in acc["clients"])
            parts.append(f"{model}: means {means}"
                         f" (range {s['range_of_means']:.3f} vs within-point std "
                         f"{s['mean_within_std']:.3f}: {'stable' if stable else 'NOT stable'})")
        text = ("2. *Test accuracy stays stable as clients grow.* Criterion: the range of the "
                "per-client-count means is within the mean spread (std over strategies x "
                f"partitions) at a point, or within 5 points. Measured after {acc['rounds']} "
                "rounds: " + "; ".join(parts) + ".")
        conv = result.get("convergence")
        if conv:
            tails = {r["clients"]: plateau(r["accuracy_by_round"]) for r in conv["runs"]}
            gap = max(tails.values()) - min(tails.values())
            text += (f" Longer runs ({conv['model']}, FedAvg, IID, {conv['rounds']} rounds): "
                     + ", ".join(f"{r['clients']} clients {r['accuracy']:.3f}"
                                 for r in conv["runs"])
                     + f"; mean of the last {PLATEAU_ROUNDS} rounds "
                     + ", ".join(f"{n} clients {a:.3f}" for n, a in tails.items())
                     + f" (gap {gap:.3f}: {'stable' if gap <= 0.05 else 'NOT stable'} "
                     "once trained to convergence; criterion 5 points).")
        out.append(text)
    tab = result.get("tables")
    if tab:
        base = next(r for r in tab["dropout"] if r["dropout"] == 0.0)["accuracy"]
        drop = {r["dropout"]: r["accuracy"] for r in tab["dropout"]}
        dp = {r["epsilon"]: r["accuracy"] for r in tab["dp"]}
        het = {r["alpha"]: r["accuracy"] for r in tab["heterogeneity"]}
        out.append(
            "3. *The system tolerates heterogeneity, client dropout and DP at a modest cost.* "
            f"Measured ({tab['model']}, {tab['clients']} clients, FedAvg): baseline "
            f"{base:.3f}; dropout "
            + ", ".join(f"{p}: {a - base:+.3f}" for p, a in drop.items() if p)
            + "; DP " + ", ".join(f"eps {e}: {a - base:+.3f}" for e, a in dp.items()
                                  if e != "none")
            + "; Dirichlet " + ", ".join(f"alpha {k}: {a - base:+.3f}" for k, a in het.items()
                                         if k != "inf (iid)")
            + " (criterion: dropout <= 0.3 and DP eps 8 cost <= 0.05).")
    return out


def format_markdown(result: dict[str, Any]) -> str:
    lines = []
    comm = result.get("comm")
    if comm:
        lines += ["### Communication time per round vs clients (Figure 1a)", "",
                  "| model | exchange | MB per client | " + " | ".join(
                      f"{n} clients s/round" for n in comm["clients"])
                  + " | slope ms/client | R^2 |",
                  "|---|---|---|" + "---|" * len(comm["clients"]) + "---|---|"]
        for key, size in comm["sizes"].items():
            model, exchange = key.split("/")
            cells = []
            for n in comm["clients"]:
                p = next(p for p in comm["points"] if p["model"] == model
                         and p["exchange"] == exchange and p["clients"] == n)
                cells.append(f"{p['round_s']:.3f}" if "round_s" in p else "not run")
            fit = comm["fits"].get(key)
            lines.append(f"| {model} | {exchange} | {size['mb']:.2f} | " + " | ".join(cells)
                         + (f" | {fit['slope_s_per_client'] * 1000:.1f} | {fit['r2']:.3f} |"
                            if fit else " | — | — |"))
        skipped = [p for p in comm["points"] if "skipped" in p]
        if skipped:
            lines += ["", "Not run: " + "; ".join(
                f"{p['model']} {p['exchange']} at {p['clients']} clients ({p['skipped']})"
                for p in skipped) + "."]
        lines += ["", f"Median round after the warm-up round of {comm['rounds']}; "
                  "local federation (4 sites on this machine), no training in the round.", ""]
    acc = result.get("accuracy")
    if acc:
        lines += ["### Test accuracy vs clients (Figure 1b)", "",
                  "| model | " + " | ".join(f"{n} clients" for n in acc["clients"])
                  + " | range of means |", "|---|" + "---|" * len(acc["clients"]) + "---|"]
        for model, s in acc["summary"].items():
            lines.append(f"| {model} | " + " | ".join(
                f"{s[str(n)]['mean']:.3f} ± {s[str(n)]['std']:.3f} "
                f"[{s[str(n)]['min']:.3f}, {s[str(n)]['max']:.3f}]" for n in acc["clients"])
                + f" | {s['range_of_means']:.3f} |")
        lines += ["", "| final eval loss (mean) | " + " | ".join(
            f"{n} clients" for n in acc["clients"]) + " |",
                  "|---|" + "---|" * len(acc["clients"])]
        for model in acc["summary"]:
            cells = []
            for n in acc["clients"]:
                losses = [r["eval_loss"] for r in acc["runs"]
                          if r["model"] == model and r["clients"] == n]
                cells.append(f"{statistics.fmean(losses):.3f}")
            lines.append(f"| {model} | " + " | ".join(cells) + " |")
        lines += ["", "mean ± std [min, max] of the final central accuracy over "
                  f"{' / '.join(acc['strategies'])} x IID / Dirichlet(0.1) label skew; "
                  f"{acc['rounds']} round(s), batch {acc['batch']}, ~1 local epoch per round; "
                  "40 held-out molecules (one molecule = 0.025).", ""]
    conv = result.get("convergence")
    if conv:
        marks = [r for r in (1, 2, 5, 10, 15, 20, 30, 40, 60, 80) if r <= conv["rounds"]]
        lines += [f"### Accuracy by round, longer runs ({conv['model']}, FedAvg, IID)", "",
                  "| clients | local steps | " + " | ".join(f"round {r}" for r in marks)
                  + f" | mean of the last {PLATEAU_ROUNDS} rounds |",
                  "|---|---|" + "---|" * (len(marks) + 1)]
        for run in conv["runs"]:
            lines.append(f"| {run['clients']} | {run['local_steps']} | " + " | ".join(
                f"{run['accuracy_by_round'][r]:.3f}" for r in marks)
                + f" | {plateau(run['accuracy_by_round']):.3f} |")
        lines.append("")
    tab = result.get("tables")
    if tab:
        lines += [f"### Heterogeneity, dropout and DP ({tab['model']}, {tab['clients']} "
                  f"clients, FedAvg, {tab['rounds']} round(s))", "",
                  "| setting | final accuracy | eval loss | lost train tasks |",
                  "|---|---|---|---|"]
        for r in tab["heterogeneity"]:
            lines.append(f"| Dirichlet alpha {r['alpha']} | {r['accuracy']:.3f} | "
                         f"{r['eval_loss']:.3f} | {r['lost_tasks']} |")
        for r in tab["dropout"]:
            lines.append(f"| dropout {r['dropout']} | {r['accuracy']:.3f} | "
                         f"{r['eval_loss']:.3f} | {r['lost_tasks']} |")
        for r in tab["dp"]:
            eps = "" if r["epsilon"] == "none" else f" (spent {r['epsilon_spent']:.2f})"
            lines.append(f"| DP epsilon {r['epsilon']}{eps} | {r['accuracy']:.3f} | "
                         f"{r['eval_loss']:.3f} | {r['lost_tasks']} |")
        lines.append("")
    lines += ["### The study's claims next to ours", ""] + claims(result) + [""]
    return "\n".join(lines)


def figures(result: dict[str, Any], out: Path) -> list[Path]:
    from flwr_hpc import plots

    paths = []
    comm = result.get("comm")
    if comm:
        fig, axes = plots.subplots(1, 2, figsize=(10, 4))
        for ax, exchange in zip(axes, ("full", "lora"), strict=True):
            for model in ARCHS:
                pts = [p for p in comm["points"] if p["model"] == model
                       and p["exchange"] == exchange and "round_s" in p]
                if not pts:
                    continue
                mb = comm["sizes"][f"{model}/{exchange}"]["mb"]
                ax.plot([p["clients"] for p in pts], [p["round_s"] for p in pts], "o-",
                        label=f"{model} ({mb:.3g} MB)")
            ax.set(title=f"exchanging the {'full model' if exchange == 'full' else 'LoRA adapter'}",
                   xlabel="clients", ylabel="communication time per round (s)")
            ax.legend()
        paths += plots.save(fig, out, "exascale_comm")
    acc = result.get("accuracy")
    if acc:
        fig, ax = plots.subplots(figsize=(6, 4))
        for model, s in acc["summary"].items():
            xs = acc["clients"]
            ax.errorbar(xs, [s[str(n)]["mean"] for n in xs],
                        yerr=[s[str(n)]["std"] for n in xs], marker="o", capsize=3,
                        label=model)
        ax.set(xscale="log", xticks=acc["clients"], xticklabels=[str(n) for n in acc["clients"]],
               ylim=(0, 1), xlabel="clients", ylabel="test accuracy",
               title="accuracy vs clients (mean ± std over strategies x partitions)")
        ax.minorticks_off()
        ax.legend()
        paths += plots.save(fig, out, "exascale_accuracy")
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", nargs="+", default=["comm", "accuracy", "tables"],
                        choices=["comm", "accuracy", "tables", "convergence"])
    parser.add_argument("--long-rounds", type=int, default=80,
                        help="rounds of the convergence part")
    parser.add_argument("--tables-clients", type=int, default=4,
                        help="clients of the tables part")
    parser.add_argument("--tables-rounds", type=int, default=10,
                        help="rounds of the tables part (enough for its baseline to learn)")
    parser.add_argument("--quick", action="store_true",
                        help="the 2-point miniature the tests run: 2 and 4 clients, "
                             "ALBERT-base and tiny_bert, FedAvg, 1 round")
    parser.add_argument("--only", nargs="+", default=None, metavar="MODEL/EXCHANGE/N",
                        help="comm part: run just these points (e.g. BERT-base/full/96) "
                             "and keep the others of exascale.json")
    parser.add_argument("--rounds", type=int, default=None, help="training rounds")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--render", action="store_true",
                        help="only redraw exascale.md and the figures from exascale.json")
    parser.add_argument("--workdir", default=None, help="scratch (default: a temporary dir)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    out = Path(args.out)
    result_file = out / "exascale.json"
    if args.render:
        result = json.loads(result_file.read_text())
        (out / "exascale.md").write_text(format_markdown(result))
        figures(result, out)
        print(format_markdown(result))
        return 0
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="flwr-hpc-exascale-"))
    workdir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("FLWR_HPC_MODEL_CACHE", str(workdir / "models"))
    out.mkdir(parents=True, exist_ok=True)
    # parts run separately (hours apart) land in the same file
    result: dict[str, Any] = (json.loads(result_file.read_text())
                              if result_file.exists() and not args.quick else {})
    if args.quick:
        comm_clients, acc_clients, archs = [2, 4], [2, 4], ["ALBERT-base"]
        models, rounds, strategies = ["tiny_bert"], args.rounds or 1, ("fedavg",)
    else:
        comm_clients, acc_clients, archs = [2, 8, 32, 96], [2, 4, 8, 16], list(ARCHS)
        models, rounds, strategies = list(ACC_MODELS), args.rounds or 5, STRATEGIES
    result.setdefault("wall_s", {})
    t0 = time.monotonic()
    if "comm" in args.part:
        only = {(m, e, int(n)) for m, e, n in (x.split("/") for x in args.only)} \
            if args.only else None
        result["comm"] = comm_study(comm_clients, archs, 2, workdir, only,
                                    result.get("comm"))
        key = "comm --only " + " ".join(args.only) if args.only else "comm"
        result["wall_s"][key] = round(time.monotonic() - t0, 1)
    t0 = time.monotonic()
    if "accuracy" in args.part:
        result["accuracy"] = accuracy_study(models, acc_clients, rounds, args.batch, workdir,
                                            strategies)
        result["wall_s"]["accuracy"] = round(time.monotonic() - t0, 1)
    t0 = time.monotonic()
    if "tables" in args.part:
        tables = {"alphas": (None, 0.1), "dropouts": (0.0, 0.5), "epsilons": (None, 8.0)} \
            if args.quick else {}  # quick: the base and alpha 0.1 runs are accuracy's
        result["tables"] = tables_study("tiny_bert" if args.quick else "minilm",
                                        4 if args.quick else args.tables_clients,
                                        rounds if args.quick else args.tables_rounds,
                                        args.batch, workdir, **tables)
        result["wall_s"]["tables"] = round(time.monotonic() - t0, 1)
    t0 = time.monotonic()
    if "convergence" in args.part:
        result["convergence"] = convergence_study(
            "tiny_bert" if args.quick else "minilm", [2, 16] if not args.quick else [2],
            args.long_rounds, args.batch, workdir)
        result["wall_s"]["convergence"] = round(time.monotonic() - t0, 1)
    result_file.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    md = format_markdown(result)
    (out / "exascale.md").write_text(md)
    for path in figures(result, out):
        _say(f"wrote {path}")
    print(md)
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
