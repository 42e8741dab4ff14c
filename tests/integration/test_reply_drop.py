"""Replies leave the site stores once the strategy has used them, during the run (#22):
every reply used to stay in the store for the whole run (2 GiB a round at N=32, S=64 MB),
and the page cache it filled made every later writer wait for the disk."""

from __future__ import annotations

import json
import threading

import pytest
from helpers import read_tasks

from flwr_hpc.payload.reply_files import SCOPED_MIN_BYTES

CLIENTS, SITES, ROUNDS, SIZE_MB = 4, 2, 4, 16  # 8 arrays of 2 MiB: one chunk object each


def _big_files(root):
    return [p for p in root.rglob("*") if p.is_file() and p.stat().st_size >= SCOPED_MIN_BYTES]


@pytest.mark.slow(20)
@pytest.mark.parametrize("streaming", [True, False], ids=["streaming", "flower-fedavg"])
def test_replies_are_removed_once_used_and_the_rounds_are_right(tmp_path, monkeypatch,
                                                               streaming):
    from flwr_hpc.bench.transport import APP_DIR, bench_federation
    from flwr_hpc.fab import build_fab
    from flwr_hpc.server.runner import execute_run
    from flwr_hpc.server.runs import prepare_run

    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "home"))
    fed = bench_federation(CLIENTS, SITES, tmp_path)
    sites = tmp_path / "sites"
    result_file = tmp_path / "result.json"
    run_dir = prepare_run(build_fab(APP_DIR),
                          {"rounds": ROUNDS, "size-mb": SIZE_MB, "streaming": streaming,
                           "result-file": str(result_file)}, fed, home=tmp_path / "home")
    peak, done = [0], threading.Event()

    def watch():  # the reply files present at any moment of the run
        while not done.wait(0.05):
            peak[0] = max(peak[0], len(list(sites.glob("*/store/replies/*/*"))))

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        status = execute_run(run_dir)
    finally:
        done.set()
        watcher.join()
    assert status == "finished:completed", (run_dir / "log.txt").read_text()[-3000:]
    assert len(json.loads(result_file.read_text())["round_s"]) == ROUNDS

    train = [t for t in read_tasks(run_dir) if t["phase"] == "train"]
    assert len(train) == CLIENTS * ROUNDS and {t["outcome"] for t in train} == {"ok"}
    reply_bytes = SIZE_MB * 2**20
    assert all(reply_bytes <= t["bytes_from_site"] < 1.01 * reply_bytes for t in train)
    # every reply was written apart (none of its 8 chunks in objects/), as one pack file
    per_reply = 8
    # ... and removed once used: never more than about one round's replies at once (all
    # four of a round may arrive before the first is added), and none left at the end
    assert 0 < peak[0] <= 2 * CLIENTS * per_reply, peak
    assert peak[0] <= 2 * CLIENTS, peak  # one file per reply (payload.reply_files.ReplyScope)
    from flwr_hpc.payload.reply_files import settle_reply_drops

    assert settle_reply_drops()  # the removals queued so far are done
    assert list(sites.glob("*/store/replies/*/*")) == []
    # what stays: each round's global model at each site (8 chunk files), no update
    for site in ("site0", "site1"):
        assert len(_big_files(sites / site / "store" / "objects")) == ROUNDS * per_reply
