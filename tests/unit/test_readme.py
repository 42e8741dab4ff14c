"""The README's job examples stay valid: each `overrides="..."` composes and validates."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from strategies.job import compose_job

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_override_examples_compose():
    examples = re.findall(r'overrides="([^"]*)"', README.read_text())
    assert len(examples) >= 3
    for text in examples:
        job = compose_job(shlex.split(text))
        for item in shlex.split(text):
            key, _, value = item.partition("=")
            if "." not in key:  # a group selection, e.g. model=minilm
                assert job[key]["name" if key != "dp" else "type"] == value, item


def test_readme_federation_example_validates():
    import yaml

    from flwr_hpc.config import FederationConfig

    text = README.read_text()
    block = re.search(r"```yaml\n# federation: example\n(.*?)```", text, re.S).group(1)
    fed = FederationConfig.from_dict(yaml.safe_load(block), source="README.md")
    site = fed.site("polaris")
    assert fed.uses_transfer() and site.payload["type"] == "globus-transfer"
    assert site.compute["resource_specification"] == {"num_nodes": 1, "ranks_per_node": 4}
    assert fed.transfer["deadline_s"] == 1800
