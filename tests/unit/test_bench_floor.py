"""The transport benchmark's floor (#22): the per-byte work a round cannot avoid under the
configured durability, its components, and how it scales."""

from __future__ import annotations

import pytest

from flwr_hpc.bench.transport import floor_bytes, floor_round, measure_floor

MiB = 2**20
# bytes/s, round numbers so that every component can be checked by hand
BW = {"write": 2e9, "read": 4e9, "sha256": 1e9, "memcpy": 10e9, "fsync_write": 0.5e9}


def test_components_are_bytes_over_bandwidth_and_add_up():
    f = floor_round(32, 4, 64 * MiB, BW, cores=2)
    moved = (32 + 4) * 64 * MiB  # the model once per site, every update once
    hashed = 64 * MiB + 4 * 64 * MiB + 2 * 32 * 64 * MiB  # server + sites; both ends
    assert f["bytes"] == {"down": 4 * 64 * MiB, "up": 32 * 64 * MiB, "moved": moved,
                          "hashed": hashed}
    assert f["components_s"] == pytest.approx({
        "write_s": moved / 2e9, "read_s": moved / 4e9, "sha256_s": hashed / 1e9,
        "memcpy_s": moved / 10e9})
    assert f["round_s"] == pytest.approx(sum(f["components_s"].values()))
    assert f["parallel_round_s"] == pytest.approx(f["round_s"] / 2)
    # the old floor, under its own key: 2 N S through memory copy and fsynced writes
    old = 2 * 32 * 64 * MiB
    assert f["fsync_floor_s"] == pytest.approx(old / 10e9 + old / 0.5e9)


def test_fsync_is_in_the_floor_only_when_configured():
    plain = floor_round(8, 4, 4 * MiB, BW)
    synced = floor_round(8, 4, 4 * MiB, BW, fsync=True)
    assert "fsync_s" not in plain["components_s"]
    moved = 12 * 4 * MiB
    assert synced["components_s"]["fsync_s"] == pytest.approx(moved / 0.5e9 - moved / 2e9)
    assert synced["round_s"] == pytest.approx(plain["round_s"]
                                              + synced["components_s"]["fsync_s"])


def test_floor_scales_with_clients_times_size():
    def work(n, s):
        return floor_round(n, 4, s * MiB, BW)["round_s"]

    per_update = (1 / 2e9 + 1 / 4e9 + 2 / 1e9 + 1 / 10e9) * MiB  # s per update MiB
    # every client adds its update's bytes; every MB of model scales the whole round
    assert work(32, 64) - work(8, 64) == pytest.approx(24 * 64 * per_update)
    assert work(96, 64) - work(32, 64) == pytest.approx(64 * 64 * per_update)
    assert work(32, 64) == pytest.approx(16 * work(32, 4))
    assert floor_bytes(96, 4, 64)["up"] == 96 * 64


def test_measured_bandwidths_are_all_there_and_leave_no_file(tmp_path):
    bw = measure_floor(tmp_path, probe_mb=8)
    assert set(bw) == {"memcpy", "write", "read", "sha256", "fsync_write"}
    assert all(v > 1e6 for v in bw.values()), bw  # more than 1 MB/s: measured, not zero
    assert list(tmp_path.iterdir()) == []
