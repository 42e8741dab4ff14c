"""`flwr-hpc bench transport` runs both transports and the floor and reports figures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import psutil

BIN = Path(sys.executable).parent


def test_bench_transport_json_has_the_figures_and_leaves_nothing_running(tmp_path):
    out = subprocess.run(
        [str(BIN / "flwr-hpc"), "bench", "transport", "--clients", "3", "--size-mb", "2",
         "--rounds", "2", "--sites", "2", "--json", "--out", str(tmp_path / "r.json")],
        capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout)
    assert result == json.loads((tmp_path / "r.json").read_text())
    for key in ("flwr_hpc_round_s", "flower_round_s", "floor_round_s",
                "server_peak_rss_bytes"):
        assert result[key] > 0, key
    assert (result["clients"], result["size_mb"]) == (3, 2.0)
    assert len(result["flwr_hpc_rounds_s"]) == len(result["flower_rounds_s"]) == 2
    assert result["bytes_per_round"] == 2 * 3 * 2 * 2**20
    # a site receives the model once per round, whether it hosts 1 or 2 clients
    staged = result["staged_bytes_per_site_round"]
    assert result["clients_per_site"] == {"site0": 2, "site1": 1}
    assert staged["site0"] < 1.2 * staged["site1"]
    assert 2 * 2**20 <= staged["site1"] < 3 * 2**20
    assert "[bench] flower: superlink + 3 supernodes started" in out.stderr
    leftovers = [p for p in psutil.process_iter(["cmdline"])
                 if any("flower-super" in c for c in (p.info["cmdline"] or []))]
    assert leftovers == []
