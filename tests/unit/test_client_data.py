"""Bundled chemistry data and its federated partitioning (part of issue #3)."""

from __future__ import annotations

import collections
import json
import subprocess
import sys
from pathlib import Path

import pytest

from client_apps.data import DEMO_DATA, load_instructions, load_partition

ROOT = Path(__file__).resolve().parents[2]


def test_demo_set_is_small_and_in_smolinstruct_form():
    assert DEMO_DATA.stat().st_size <= 1_000_000
    rows = [json.loads(line) for line in DEMO_DATA.read_text().splitlines()]
    assert {r["task"] for r in rows} == {
        "canonicalization", "name_conversion-s2f", "property_prediction-mw",
        "name_conversion-i2s", "name_conversion-s2i", "property_prediction-esol"}
    assert {r["split"] for r in rows} == {"train", "test"}
    ethanol_like = [r for r in rows if r["task"] == "name_conversion-s2f"][0]
    assert ethanol_like["output"].startswith("<MOLFORMULA> ")
    assert ethanol_like["output_core_tag_right"] == "</MOLFORMULA>"


def test_generator_is_deterministic_and_answers_are_correct(tmp_path):
    out = tmp_path / "d.jsonl"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_chem_data.py"), "--out",
                    str(out)], check=True, capture_output=True)
    assert out.read_bytes() == DEMO_DATA.read_bytes()
    from rdkit import Chem
    from rdkit.Chem import Descriptors, rdMolDescriptors

    checked = collections.Counter()
    for line in out.read_text().splitlines():
        row = json.loads(line)
        task = row["task"]
        if task == "name_conversion-i2s":
            assert Chem.MolToSmiles(Chem.MolFromSmiles(row["raw_output"])) == row["raw_output"]
        elif task != "name_conversion-s2i":
            mol = Chem.MolFromSmiles(row["raw_input"])
            assert mol is not None, row
            if task == "canonicalization":
                assert row["raw_output"] == Chem.MolToSmiles(mol)
            elif task == "name_conversion-s2f":
                assert row["raw_output"] == rdMolDescriptors.CalcMolFormula(mol)
            elif task == "property_prediction-mw":
                assert float(row["raw_output"]) == pytest.approx(Descriptors.MolWt(mol), abs=0.05)
            else:
                assert -15 < float(row["raw_output"]) < 5  # logS
        assert row["output"] == (f"{row['output_core_tag_left']} {row['raw_output']} "
                                 f"{row['output_core_tag_right']}")
        checked[task] += 1
    assert len(checked) == 6 and min(checked.values()) >= 250


@pytest.mark.parametrize("kind", ["iid", "dirichlet"])
def test_partitions_are_disjoint_and_cover_train_split(kind):
    train = load_instructions(split="train")
    parts = [load_partition(i, 4, kind=kind) for i in range(4)]
    ids = [set(p["sample_id"]) for p in parts]
    for i in range(4):
        for j in range(i + 1, 4):
            assert not ids[i] & ids[j]
    assert set().union(*ids) == set(train["sample_id"])
    assert {r for p in parts for r in p["split"]} == {"train"}


def test_dirichlet_by_task_is_skewed_and_iid_is_not():
    def max_share(kind):
        shares = []
        for i in range(4):
            counts = collections.Counter(load_partition(i, 4, kind=kind, alpha=0.1)["task"])
            shares.append(max(counts.values()) / sum(counts.values()))
        return max(shares)

    assert max_share("iid") < 0.4          # 4 tasks, ~25% each
    assert max_share("dirichlet") > 0.6     # one task dominates some partition


def test_classifier_dirichlet_skews_the_labels_and_covers_the_task():
    """A classifier's data is one task: its heterogeneity is label skew (Dirichlet over
    the class), as in the exascale study -- skewing the one task would change nothing."""
    from client_apps.classification import row_label

    def label(row):
        return row_label(row, 200.0)

    task = ["property_prediction-mw"]
    every = load_instructions(split="train", tasks=task)
    overall = sum(label(r) for r in every) / len(every)
    assert 0.3 < overall < 0.7  # the threshold splits the molecules roughly in half
    parts = [load_partition(i, 8, kind="dirichlet", alpha=0.1, tasks=task, label=label)
             for i in range(8)]
    assert sorted(s for p in parts for s in p["sample_id"]) == sorted(every["sample_id"])
    shares = [sum(p["label"]) / len(p) for p in parts]
    assert max(abs(s - overall) for s in shares) > 0.35  # some node holds mostly one class
    iid = [load_partition(i, 8, kind="iid", tasks=task) for i in range(8)]
    assert "label" not in iid[0].column_names


def test_bad_inputs_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_instructions(tmp_path / "nope.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input": "x", "output": "y"}\n')
    with pytest.raises(ValueError, match="task, split"):
        load_instructions(bad)
    with pytest.raises(ValueError, match="partition-id 4"):
        load_partition(4, 4)
