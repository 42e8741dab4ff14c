"""Scaling run for the README: `python benchmarks/scaling.py [--clients 2 8 32 96] [--sizes 4 64]`.

Runs `flwr-hpc bench transport` for every (clients, size) pair, writes each result to
`benchmarks/results/transport-n<N>-s<S>.json`, then renders `benchmarks/results/table.md`
and `benchmarks/results/round_time.svg` (round time vs clients: flwr-hpc, Flower, floor)
from every result present. `--no-flower-above N` skips Flower's deployment for larger N
(N supernode processes need about 150 MB each).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def run(clients: int, size: float, rounds: int, flower: bool) -> None:
    out = RESULTS / f"transport-n{clients}-s{size:g}.json"
    cmd = [str(Path(sys.executable).parent / "flwr-hpc"), "bench", "transport",
           "--clients", str(clients), "--size-mb", str(size), "--rounds", str(rounds),
           "--json", "--out", str(out)]
    if not flower:
        cmd.append("--no-flower")
    print("$", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True, stdin=subprocess.DEVNULL)


def load() -> list[dict]:
    rows = [json.loads(p.read_text()) for p in sorted(RESULTS.glob("transport-*.json"))]
    return sorted(rows, key=lambda r: (r["size_mb"], r["clients"]))


def table(rows: list[dict]) -> str:
    head = ("| clients | size MB | flwr-hpc s/round | Flower s/round | floor s/round | "
            "flwr-hpc / Flower | flwr-hpc / floor | server peak RSS MiB | staged per site "
            "per round MiB (clients at site) |\n|---|---|---|---|---|---|---|---|---|")
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
        staged = ", ".join(f"{r['staged_bytes_per_site_round'][s] / 2**20:.0f} "
                           f"({r['clients_per_site'][s]})"
                           for s in sorted(r["staged_bytes_per_site_round"]))
        lines.append(
            f"| {r['clients']} | {r['size_mb']:g} | {r['flwr_hpc_round_s']:.2f} | "
            f"{flower_cell} | {r['floor_round_s']:.2f} | "
            f"{ratio} | "
            f"{r['flwr_hpc_over_floor']:.2f} | {r['server_peak_rss_bytes'] / 2**20:.0f} | "
            f"{staged} |")
    return "\n".join(lines) + "\n"


def _failed_part_way(r: dict) -> bool:
    return bool(r.get("flower_error") and r.get("flower_rounds_s"))


def svg(rows: list[dict]) -> str:
    """Round time vs clients, log-log, one panel per size: flwr-hpc, Flower, floor."""
    sizes = sorted({r["size_mb"] for r in rows})
    w, h, pad = 360, 260, 48
    series = (("flwr_hpc_round_s", "#1f77b4", "flwr-hpc"),
              ("flower_round_s", "#d62728", "Flower deployment"),
              ("floor_round_s", "#7f7f7f", "floor"))
    values = [r[k] for r in rows for k, _, _ in series if r.get(k)]
    values += [r["flower_rounds_s"][0] for r in rows if _failed_part_way(r)]
    lo, hi = math.log10(min(values)) - 0.2, math.log10(max(values)) + 0.2
    xs = sorted({r["clients"] for r in rows})
    xlo, xhi = math.log10(min(xs)) - 0.1, math.log10(max(xs)) + 0.1
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{max(w * len(sizes), 720)}" '
             f'height="{h + 30}" font-family="sans-serif" font-size="11">']
    for i, size in enumerate(sizes):
        ox = i * w

        def px(n, ox=ox):
            return ox + pad + (math.log10(n) - xlo) / (xhi - xlo) * (w - pad - 10)

        def py(s):
            return h - pad + 10 - (math.log10(s) - lo) / (hi - lo) * (h - pad - 10)

        parts.append(f'<text x="{ox + w / 2}" y="14" text-anchor="middle">'
                     f'{size:g} MB per client</text>')
        parts.append(f'<line x1="{ox + pad}" y1="{h - pad + 10}" x2="{ox + w - 10}" '
                     f'y2="{h - pad + 10}" stroke="black"/>')
        parts.append(f'<line x1="{ox + pad}" y1="20" x2="{ox + pad}" y2="{h - pad + 10}" '
                     'stroke="black"/>')
        for n in xs:
            parts.append(f'<text x="{px(n):.1f}" y="{h - pad + 24}" '
                         f'text-anchor="middle">{n}</text>')
        for e in range(math.ceil(lo), math.floor(hi) + 1):
            parts.append(f'<text x="{ox + pad - 4}" y="{py(10 ** e) + 4:.1f}" '
                         f'text-anchor="end">{10 ** e:g}</text>')
        parts.append(f'<text x="{ox + w / 2}" y="{h - pad + 38}" text-anchor="middle">'
                     'clients</text>')
        parts.append(f'<text x="{ox + 12}" y="{h / 2}" transform="rotate(-90 {ox + 12} '
                     f'{h / 2})" text-anchor="middle">s per round</text>')
        for key, color, _ in series:
            pts = [(r["clients"], r[key]) for r in rows
                   if r["size_mb"] == size and r.get(key)]
            if not pts:
                continue
            path = " ".join(f"{px(n):.1f},{py(s):.1f}" for n, s in pts)
            parts.append(f'<polyline points="{path}" fill="none" stroke="{color}" '
                         'stroke-width="2"/>')
            parts += [f'<circle cx="{px(n):.1f}" cy="{py(s):.1f}" r="3" fill="{color}"/>'
                      for n, s in pts]
        for r in rows:  # Flower failed part-way: its first (warm-up) round, hollow
            if r["size_mb"] == size and _failed_part_way(r):
                parts.append(f'<circle cx="{px(r["clients"]):.1f}" '
                             f'cy="{py(r["flower_rounds_s"][0]):.1f}" r="4" fill="none" '
                             'stroke="#d62728" stroke-width="1.5"/>')
    if any(_failed_part_way(r) for r in rows):
        parts.append(f'<circle cx="{16 + 150 * len(series)}" cy="{h + 18}" r="4" '
                     'fill="none" stroke="#d62728" stroke-width="1.5"/>'
                     f'<text x="{26 + 150 * len(series)}" y="{h + 22}">Flower: warm-up '
                     'round, then failed</text>')
    for j, (_, color, label) in enumerate(series):
        parts.append(f'<rect x="{10 + 150 * j}" y="{h + 16}" width="12" height="4" '
                     f'fill="{color}"/><text x="{26 + 150 * j}" y="{h + 22}">{label}</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, nargs="*", default=[2, 8, 32, 96])
    parser.add_argument("--sizes", type=float, nargs="*", default=[4, 64])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-flower-above", type=int, default=32)
    parser.add_argument("--render-only", action="store_true")
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    if not args.render_only:
        for size in args.sizes:
            for n in args.clients:
                run(n, size, args.rounds, flower=n <= args.no_flower_above)
    rows = load()
    (RESULTS / "table.md").write_text(table(rows))
    (RESULTS / "round_time.svg").write_text(svg(rows))
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
