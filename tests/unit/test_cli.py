"""`flwr-hpc` itself: --version, and run ids that can be pasted into `flwr log`."""

from __future__ import annotations

import os
from importlib.metadata import version

from helpers import cli


def test_version_names_flwr_hpc_and_flower():
    res = cli("flwr-hpc", "--version")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().startswith(
        f"flwr-hpc {version('flwr-hpc')} (flwr {version('flwr')}, Python ")


def test_status_prints_whole_run_ids_on_a_narrow_terminal(flwr_home, quickstart_fab):
    from flwr_hpc.config import load_federation
    from flwr_hpc.server.runs import prepare_run

    run_dir = prepare_run(quickstart_fab, {}, load_federation([]), home=flwr_home)
    res = cli("flwr-hpc", "status", env={**os.environ, "COLUMNS": "60"})
    assert res.returncode == 0, res.stderr
    assert run_dir.name in res.stdout, res.stdout
