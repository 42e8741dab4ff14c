"""The README's job examples stay valid: each `overrides="..."` composes and validates."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from strategies.job import compose_job

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_override_examples_compose():
    examples = re.findall(r'overrides="([^"]*)"', README.read_text())
    assert len(examples) >= 3
    for text in examples:
        job = compose_job(shlex.split(text))
        for item in shlex.split(text):
            key, _, value = item.partition("=")
            if "." not in key:  # a group selection, e.g. model=minilm
                assert job[key]["name" if key != "dp" else "type"] == value, item
