"""Scaling run for the README: `python benchmarks/scaling.py [--clients 2 8 32 96] [--sizes 4 64]`.

Runs `flwr-hpc bench transport` for every (clients, size) pair, writes each result to
`benchmarks/results/transport-n<N>-s<S>.json`, then renders `benchmarks/results/table.md`
and `benchmarks/results/round_time.{png,svg}` (round time vs clients: flwr-hpc, Flower, floor)
from every result present. `--no-flower-above N` skips Flower's deployment for larger N
(N supernode processes need about 150 MB each).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


FLOWER_KEYS = ("flower_round_s", "flower_rounds_s", "flower_error",
               "flower_serverapp_peak_rss_bytes", "flower_superlink_peak_rss_bytes")


def run(clients: int, size: float, rounds: int, flower: bool, keep_flower: bool = False
        ) -> None:
    out = RESULTS / f"transport-n{clients}-s{size:g}.json"
    old = json.loads(out.read_text()) if keep_flower and out.exists() else {}
    cmd = [str(Path(sys.executable).parent / "flwr-hpc"), "bench", "transport",
           "--clients", str(clients), "--size-mb", str(size), "--rounds", str(rounds),
           "--json", "--out", str(out)]
    if not flower:
        cmd.append("--no-flower")
    print("$", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True, stdin=subprocess.DEVNULL)
    if old.get("flower_round_s") or old.get("flower_error"):  # Flower's, from its own run
        new = json.loads(out.read_text())
        new.update({k: old[k] for k in FLOWER_KEYS if k in old})
        new["flower_from_earlier_run"] = True
        if new.get("flower_round_s"):
            new["flwr_hpc_over_flower"] = new["flwr_hpc_round_s"] / new["flower_round_s"]
        if new.get("flower_error") and new.get("flower_rounds_s"):
            k = len(new["flower_rounds_s"])
            new["flwr_hpc_over_flower_completed_rounds"] = (
                sum(new["flwr_hpc_rounds_s"][:k]) / sum(new["flower_rounds_s"]))
        out.write_text(json.dumps(new, indent=2, sort_keys=True))


def load() -> list[dict]:
    rows = [json.loads(p.read_text()) for p in sorted(RESULTS.glob("transport-*.json"))]
    return sorted(rows, key=lambda r: (r["size_mb"], r["clients"]))


def table(rows: list[dict]) -> str:
    head = ("| clients | size MB | flwr-hpc s/round | Flower s/round | floor s/round | "
            "flwr-hpc / Flower | flwr-hpc / floor | flwr-hpc / parallel floor | "
            "flwr-hpc / fsync floor | server peak RSS MiB | staged per site per round MiB "
            "(clients at site) |\n|---|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        flower = r.get("flower_round_s")
        ratio = f"{r['flwr_hpc_over_flower']:.3f}" if flower else "—"
        flower_cell = (f"{flower:.2f}" if flower else
                       "failed" if r.get("flower_error") else "not run")
        partial = r.get("flower_rounds_s") if r.get("flower_error") else None
        if partial:  # Flower failed part-way: compare the rounds it completed
            k = len(partial)
            done = "round 1" if k == 1 else f"rounds 1–{k}"
            flower_cell = (f"failed in round {k + 1}; {done}: "
                           + ", ".join(f"{v:.1f}" for v in partial))
            ratio = f"{r['flwr_hpc_over_flower_completed_rounds']:.3f} ({done})"
        if r.get("flower_from_earlier_run") and flower_cell != "not run":
            flower_cell += " *"  # Flower's deployment measured in an earlier run
        staged = ", ".join(f"{r['staged_bytes_per_site_round'][s] / 2**20:.0f} "
                           f"({r['clients_per_site'][s]})"
                           for s in sorted(r["staged_bytes_per_site_round"]))
        lines.append(
            f"| {r['clients']} | {r['size_mb']:g} | {r['flwr_hpc_round_s']:.2f} | "
            f"{flower_cell} | {r['floor_round_s']:.2f} | "
            f"{ratio} | "
            f"{r['flwr_hpc_over_floor']:.2f} | {r['flwr_hpc_over_parallel_floor']:.2f} | "
            f"{r['flwr_hpc_over_fsync_floor']:.2f} | "
            f"{r['server_peak_rss_bytes'] / 2**20:.0f} | "
            f"{staged} |")
    if any(r.get("flower_from_earlier_run") for r in rows):
        lines.append("\n\\* Flower's deployment as measured in an earlier run of this grid "
                     "(`--keep-flower`); flwr-hpc, the floors and the ratio to Flower from "
                     "this one.")
    return "\n".join(lines) + "\n"


def _failed_part_way(r: dict) -> bool:
    return bool(r.get("flower_error") and r.get("flower_rounds_s"))


def figure(rows: list[dict]) -> list[Path]:
    """Round time vs clients, log-log, one panel per size: flwr-hpc, Flower, floor
    (``round_time.png`` and ``.svg`` through :mod:`flwr_hpc.plots`)."""
    from flwr_hpc import plots

    sizes = sorted({r["size_mb"] for r in rows})
    series = (("flwr_hpc_round_s", "#1f77b4", "flwr-hpc"),
              ("flower_round_s", "#d62728", "Flower deployment"),
              ("floor_round_s", "#7f7f7f", "floor (page cache, sha256 both ends)"),
              ("parallel_floor_round_s", "#c7c7c7", "floor over the cores"),
              ("fsync_floor_round_s", "#bcbd22", "old floor (2NS, fsynced)"))
    if any(r.get("flower_from_earlier_run") for r in rows):
        series = tuple((k, c, f"{lbl} (earlier run)" if k == "flower_round_s" else lbl)
                       for k, c, lbl in series)
    fig, axes = plots.subplots(1, len(sizes), figsize=(5 * len(sizes), 4), squeeze=False)
    for ax, size in zip(axes[0], sizes, strict=True):
        for key, color, label in series:
            pts = [(r["clients"], r[key]) for r in rows if r["size_mb"] == size and r.get(key)]
            if pts:
                ax.plot(*zip(*pts, strict=True), "o-", color=color, label=label)
        failed = [r for r in rows if r["size_mb"] == size and _failed_part_way(r)]
        if failed:  # Flower failed part-way: its first (warm-up) round, hollow
            ax.plot([r["clients"] for r in failed], [r["flower_rounds_s"][0] for r in failed],
                    "o", mfc="none", color="#d62728", label="Flower: warm-up round, then failed")
        xs = sorted({r["clients"] for r in rows})
        ax.set(xscale="log", yscale="log", xlabel="clients", ylabel="s per round",
               title=f"{size:g} MB per client")
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    return plots.save(fig, RESULTS, "round_time")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, nargs="*", default=[2, 8, 32, 96])
    parser.add_argument("--sizes", type=float, nargs="*", default=[4, 64])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-flower-above", type=int, default=32)
    parser.add_argument("--render-only", action="store_true")
    parser.add_argument("--keep-flower", action="store_true",
                        help="run flwr-hpc and the floor only; keep Flower's figures from "
                             "the results already there (marked as from an earlier run)")
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    if not args.render_only:
        for size in args.sizes:
            for n in args.clients:
                run(n, size, args.rounds, flower=n <= args.no_flower_above
                    and not args.keep_flower, keep_flower=args.keep_flower)
    rows = load()
    (RESULTS / "table.md").write_text(table(rows))
    figure(rows)
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
