"""The README main job, as a user sees it: `flwr run . hpc --stream` reads like a report.

Default composition (8 FedAvg rounds, 3 sites, 4 clients) with fewer local steps so it
runs in seconds: the stream is at most 80 lines, the round table is whole aligned lines,
the closing summary says what happened and where things are, `log.txt` is timestamped and
`debug.txt` keeps every detail the stream leaves out.
"""

from __future__ import annotations

import json
import re

import pytest
from helpers import cli as _cli

STAMP = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ INFO     "


@pytest.mark.slow(45)
def test_main_job_stream_is_a_short_report(superlink, flwr_home, lora_app):
    run = _cli("flwr", "run", ".", "hpc", "--stream", "-c", "local-steps=2",
               "-c", 'overrides="evaluate.max_generate=2"', cwd=lora_app, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    out = run.stdout
    run_id = int(out.split("Successfully started run ")[1].split()[0])
    run_dir = flwr_home / "hpc" / "runs" / str(run_id)
    lines = out.splitlines()
    assert len(lines) <= 80, f"{len(lines)} lines:\n{out}"

    # the banner shows a few keys, not the job config
    assert "'job-digest'" in out and "local-steps': 2" in out
    assert '"model"' not in out and "Starting StreamingFedAvg strategy" in out
    # Flower's per-round chatter and its "Final results" block are not in the stream
    for noise in ("Final results", "[ROUND 1/8]", "configure_train", "MetricRecord",
                  "tasks done", "checkpoint written"):
        assert noise not in out, noise
    # one line per phase
    for r in range(1, 9):
        assert len(re.findall(rf"\[round {r}\] train: 4/4 replies in ", out)) == 1
        assert len(re.findall(rf"\[round {r}\] evaluate: 4/4 replies in ", out)) == 1

    # the table: a header and 9 rows, each its own timestamped line, columns aligned
    header = next(i for i, ln in enumerate(lines) if re.search(r"round +train_loss", ln))
    rows = [ln for ln in lines if re.fullmatch(STAMP + r" +\d+ +(-|\d+\.\d{4}) .*", ln)]
    assert len(rows) == 9, "\n".join(lines)
    table = [re.sub(STAMP, "", ln) for ln in [lines[header], *rows]]

    def cell_ends(line: str) -> list[int]:  # cells are separated by two spaces or more
        return [m.end() for m in re.finditer(r"\S+(?: \S+)*", line)]

    # every cell ends where its column's name ends: whole, right-aligned lines
    assert all(cell_ends(ln) == cell_ends(table[0]) for ln in table), "\n".join(table)
    assert len(cell_ends(table[0])) == 6
    assert rows[1].endswith("696.0 KiB") and rows[0].endswith(" 0 B")  # readable bytes

    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in metrics] == list(range(9))
    # the closing summary, with the numbers of metrics.jsonl
    summary = "\n".join(lines[-9:])
    assert f"run {run_id}: 8 round(s) in " in summary
    # the allocation charged: run time x 1 node per task on the local federation
    assert re.search(r"  charged     [0-9.e-]+ node-hours \(alpha [0-9.e-]+, beta [0-9.e-]+, "
                     r"gamma [0-9.e-]+\)", summary), summary
    first, last = metrics[0]["eval_loss"], metrics[-1]["eval_loss"]
    assert f"eval_loss   {first:.4f} (round 0) -> {last:.4f} (round 8)" in summary
    sent = sum(m["bytes_sent"] for m in metrics)
    assert f"{sent / 2**20:.1f} MiB to sites" in summary
    assert f"{run_dir}/global/round-8" in summary and f"{run_dir}/metrics.jsonl" in summary
    assert f"flwr log {run_id} hpc" in summary and f"flwr pull {run_id} hpc" in summary

    # log.txt: the stream, every line timestamped; debug.txt: the detail
    log = (run_dir / "log.txt").read_text().splitlines()
    assert all(re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ (INFO|WARNING) ", ln) for ln in log)
    debug = (run_dir / "debug.txt").read_text()
    for detail in ("[ROUND 8/8]", "Final results", "tasks done (site", "checkpoint written"):
        assert detail in debug, detail
