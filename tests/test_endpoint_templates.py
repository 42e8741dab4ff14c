"""Endpoint configs for site admins load with the real Globus Compute endpoint loader, and
the federation template points at a launcher each of them supports."""

from __future__ import annotations

from pathlib import Path

import pytest

from flwr_hpc.config import load_federation

DOCS = Path(__file__).resolve().parent.parent / "docs" / "endpoints"
EXPECTED = {  # facility -> (provider, mpi launcher)
    "polaris": ("PBSProProvider", "mpiexec"),
    "aurora": ("PBSProProvider", "mpiexec"),
    "perlmutter": ("SlurmProvider", "srun"),
    "frontier": ("SlurmProvider", "srun"),
}


@pytest.mark.parametrize("facility", sorted(EXPECTED))
def test_endpoint_config_loads_with_the_endpoint_loader(facility):
    from globus_compute_endpoint.endpoint.config.utils import load_config_yaml

    config = load_config_yaml((DOCS / f"{facility}.yaml").read_text())
    engine = config.engine
    try:
        assert type(engine).__name__ == "GlobusMPIEngine"
        provider, launcher = EXPECTED[facility]
        assert type(engine.provider).__name__ == provider
        assert engine.executor.mpi_launcher == launcher
        assert engine.provider.walltime == "01:00:00"
    finally:
        engine.shutdown()


def test_federation_template_matches_the_endpoint_configs():
    fed = load_federation(["federation=doe4"])
    assert {s.name for s in fed.sites} == set(EXPECTED)
    for site in fed.sites:
        spec = site.compute["resource_specification"]
        assert site.compute["type"] == "globus"
        assert spec["num_nodes"] >= 1 and spec["ranks_per_node"] == site.launcher["ranks"]
        assert site.launcher["type"] in ("parsl", "srun", "mpiexec")
