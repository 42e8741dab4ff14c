"""Endpoint configs for site admins load with the real Globus Compute endpoint loader, and
the federation template points at a launcher each of them supports."""

from __future__ import annotations

from pathlib import Path

import pytest

from flwr_hpc._proc import large_buffer_env
from flwr_hpc.config import load_federation

DOCS = Path(__file__).resolve().parents[2] / "docs" / "endpoints"
# the site workers reuse payload buffers as local ones do (flwr_hpc._proc)
_TUNABLES = large_buffer_env({})["GLIBC_TUNABLES"]
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
        assert f"export GLIBC_TUNABLES={_TUNABLES}" in engine.provider.worker_init
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
        assert site.payload["type"] == "globus-transfer"  # no shared filesystem assumed
    assert fed.uses_transfer() and fed.transfer["collection_id"]


def _render(facility: str, options: dict) -> str:
    import json
    import os
    import pwd

    from globus_compute_endpoint.endpoint.config.utils import render_config_user_template
    from globus_compute_endpoint.endpoint.identity_mapper import MappedPosixIdentity

    path = DOCS / "multi-user" / f"{facility}.yaml.j2"
    schema = json.loads((DOCS / "multi-user" / "user_config_schema.json").read_text())
    identity = MappedPosixIdentity(local_user_record=pwd.getpwuid(os.getuid()),
                                   globus_identity_candidates=[], matched_identity=None)
    return render_config_user_template(None, path.read_text(), path, identity,
                                       user_config_schema=schema, user_opts=options)


@pytest.mark.parametrize("facility", sorted(EXPECTED))
def test_multi_user_templates_consume_the_federation_user_endpoint_config(facility):
    """What a multi-user endpoint does with a site's compute.user_endpoint_config: validate
    it against the schema, render the template, load the result as a user endpoint."""
    from globus_compute_endpoint.endpoint.config.utils import load_config_yaml

    options = load_federation(["federation=doe4"]).site(facility).compute[
        "user_endpoint_config"]
    config = load_config_yaml(_render(facility, dict(options)))
    engine = config.engine
    try:
        assert type(engine).__name__ == "GlobusMPIEngine"
        provider, launcher = EXPECTED[facility]
        assert type(engine.provider).__name__ == provider
        assert engine.executor.mpi_launcher == launcher
        assert engine.provider.account == options["account"]
        assert engine.provider.walltime == options["walltime"]
        for key in ("queue", "qos", "partition", "constraint"):
            if key in options:
                assert getattr(engine.provider, key) == options[key]
        assert 'flwr-env"/bin/activate' in engine.provider.worker_init  # shell-quoted
        assert f"export GLIBC_TUNABLES={_TUNABLES}" in engine.provider.worker_init
    finally:
        engine.shutdown()


def test_multi_user_schema_refuses_typos_and_shell_injection():
    import jsonschema

    with pytest.raises(jsonschema.ValidationError, match="acount"):
        _render("polaris", {"acount": "MYPROJ"})
    with pytest.raises(jsonschema.ValidationError):
        _render("polaris", {"account": "MYPROJ; rm -rf ~"})
    with pytest.raises(jsonschema.ValidationError, match="account"):
        _render("frontier", {"partition": "batch"})
