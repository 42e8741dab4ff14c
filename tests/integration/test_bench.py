"""`flwr-hpc bench transport` runs both transports and the floor and reports figures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

BIN = Path(sys.executable).parent


@pytest.mark.slow(40)
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
    # the floor under the configured durability (page cache: no flush), from the
    # bandwidths measured in this run; the old fsync floor under its own key
    assert result["durability"] == "page cache"
    comp, bw = result["floor_components_s"], result["bandwidth_gb_per_s"]
    moved = (3 + 2) * 2 * 2**20  # the model once per site, each update once
    assert set(comp) == {"write_s", "read_s", "sha256_s", "memcpy_s"}
    assert comp["write_s"] == pytest.approx(moved / (bw["write"] * 1e9))
    assert comp["sha256_s"] == pytest.approx((2 + 2 * 2 + 2 * 3 * 2) * 2**20
                                             / (bw["sha256"] * 1e9))
    assert result["floor_round_s"] == pytest.approx(sum(comp.values()))
    assert result["parallel_floor_round_s"] == pytest.approx(result["floor_round_s"]
                                                             / result["floor_cores"])
    assert result["fsync_floor_round_s"] > 0
    assert result["flwr_hpc_over_floor"] == pytest.approx(
        result["flwr_hpc_round_s"] / result["floor_round_s"])
    # a site receives the model once per round, whether it hosts 1 or 2 clients
    staged = result["staged_bytes_per_site_round"]
    assert result["clients_per_site"] == {"site0": 2, "site1": 1}
    assert staged["site0"] < 1.2 * staged["site1"]
    assert 2 * 2**20 <= staged["site1"] < 3 * 2**20
    assert "[bench] flower: superlink + 3 supernodes started" in out.stderr
    leftovers = [p for p in psutil.process_iter(["cmdline"])
                 if any("flower-super" in c for c in (p.info["cmdline"] or []))]
    assert leftovers == []


def test_flower_patience_reaches_the_modules_that_use_it(tmp_path):
    """The bench's sitecustomize sets Flower's liveness constants before any Flower module
    binds them (flwr 1.41 has no flag for them)."""
    import os

    from flwr_hpc.bench.transport import (
        FLOWER_HTTP_TIMEOUT_S,
        FLOWER_PATIENCE,
        _patient_flower_pythonpath,
    )

    path = _patient_flower_pythonpath(tmp_path)
    probe = ("import flwr.supercore.heartbeat as hb, flwr.supernode.fleet_http_client as fc, "
             "flwr.server.superlink.linkstate.utils as lu, "
             "flwr.supercore.corestate.in_memory_corestate as cs; "
             "from flwr.supercore.runtime.runtime_http_client import RuntimeHttpClient; "
             "c = RuntimeHttpClient('http://127.0.0.1:1'); "
             "print(hb.HEARTBEAT_DEFAULT_INTERVAL, fc.HEARTBEAT_CALL_TIMEOUT, "
             "lu.HEARTBEAT_PATIENCE, cs.OBJECT_PUSH_SESSION_TTL_SECONDS, "
             "c._client.timeout.read)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": path}, timeout=120, check=True)
    common = FLOWER_PATIENCE["flwr.common.constant"]
    assert out.stdout.split() == [
        str(common["HEARTBEAT_DEFAULT_INTERVAL"]), str(common["HEARTBEAT_CALL_TIMEOUT"]),
        str(common["HEARTBEAT_PATIENCE"]),
        str(FLOWER_PATIENCE["flwr.supercore.constant"]["OBJECT_PUSH_SESSION_TTL_SECONDS"]),
        str(FLOWER_HTTP_TIMEOUT_S)]
    assert out.stdout.split() != ["30", "5", "2", "180", "30.0"]  # Flower's defaults


def test_large_buffer_env_keeps_the_users_tunables_and_makes_buffers_reused():
    from flwr_hpc._proc import TUNABLES, large_buffer_env

    env = large_buffer_env({"GLIBC_TUNABLES": "glibc.malloc.mmap_max=7:glibc.foo=1"})
    tunables = env["GLIBC_TUNABLES"].split(":")
    assert tunables[:2] == ["glibc.malloc.mmap_max=7", "glibc.foo=1"]  # the user's win
    assert [t.split("=")[0] for t in tunables].count("glibc.malloc.mmap_max") == 1
    assert f"glibc.malloc.trim_threshold={TUNABLES['glibc.malloc.trim_threshold']}" in tunables
    assert large_buffer_env(env) == env  # applying it twice changes nothing
    # a process started with it keeps freed payload-sized buffers for the next message
    probe = ("def rss(): return int(open('/proc/self/statm').read().split()[1]) * 4096\n"
             "x = bytearray(8 << 20); del x\n"
             "keep = [bytearray(4 << 20) for _ in range(40)]; held = rss(); del keep\n"
             "freed = rss(); again = [bytearray(4 << 20) for _ in range(40)]\n"
             "print(held >> 20, freed >> 20, rss() >> 20)")
    runs = {}
    for name, environ in (("reuse", large_buffer_env({})),
                          ("unmap", {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=1048576"})):
        out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                             env={"PATH": "/usr/bin:/bin", **environ}, timeout=60, check=True)
        runs[name] = [int(v) for v in out.stdout.split()]
    held, freed, again = runs["reuse"]
    assert freed > held - 40 and again < held + 40  # kept, then reused (no growth)
    assert runs["unmap"][1] < runs["unmap"][0] - 100  # the control: unmapped when freed
