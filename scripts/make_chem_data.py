#!/usr/bin/env python
"""Generate the bundled chemistry instruction demo set in SMolInstruct form.

Source molecules: the NCI SMILES that the rdkit wheel ships (``rdkit/Data/NCI/first_5K.smi``).
Every answer is a deterministic function of the question (rdkit canonical SMILES, molecular
formula, molecular weight, Lipinski rule-of-five), so the set is learnable and exact match
is meaningful. Usage::

    python scripts/make_chem_data.py [--out client_apps/data/chem_demo.jsonl] [--molecules 500]
"""

from __future__ import annotations

import argparse
import json
import os
import random
from pathlib import Path

from rdkit import Chem, RDConfig, RDLogger
from rdkit.Chem import Descriptors, Lipinski, rdMolDescriptors

TEMPLATES = {
    "canonicalization": ("Give the canonical SMILES of <SMILES> {smiles} </SMILES>.",
                         "<SMILES>", "<SMILES> {answer} </SMILES>"),
    "name_conversion-s2f": ("What is the molecular formula of <SMILES> {smiles} </SMILES>?",
                            "<MOLFORMULA>", "<MOLFORMULA> {answer} </MOLFORMULA>"),
    "property_prediction-mw": ("What is the molecular weight of <SMILES> {smiles} </SMILES>?",
                               "<NUMBER>", "<NUMBER> {answer} </NUMBER>"),
    "property_prediction-ro5": ("Does <SMILES> {smiles} </SMILES> satisfy Lipinski's rule "
                                "of five?", "<BOOLEAN>", "<BOOLEAN> {answer} </BOOLEAN>"),
}
CLOSE = {"<SMILES>": "</SMILES>", "<MOLFORMULA>": "</MOLFORMULA>", "<NUMBER>": "</NUMBER>",
         "<BOOLEAN>": "</BOOLEAN>"}


def answer(task: str, mol: Chem.Mol) -> str:
    if task == "canonicalization":
        return Chem.MolToSmiles(mol)
    if task == "name_conversion-s2f":
        return rdMolDescriptors.CalcMolFormula(mol)
    if task == "property_prediction-mw":
        return f"{Descriptors.MolWt(mol):.1f}"
    violations = sum([Descriptors.MolWt(mol) > 500, Descriptors.MolLogP(mol) > 5,
                      Lipinski.NumHDonors(mol) > 5, Lipinski.NumHAcceptors(mol) > 10])
    return "Yes" if violations <= 1 else "No"


def generate(num_molecules: int, seed: int = 42, test_fraction: float = 0.1) -> list[dict]:
    RDLogger.DisableLog("rdApp.*")
    path = Path(RDConfig.RDDataDir) / "NCI" / "first_5K.smi"
    rng = random.Random(seed)
    mols = []
    for line in path.read_text().splitlines():
        smi = line.split()[0] if line.strip() else ""
        mol = Chem.MolFromSmiles(smi) if smi else None
        if mol is not None and 4 <= mol.GetNumHeavyAtoms() <= 24:
            mols.append(mol)
    rng.shuffle(mols)
    rows = []
    for i, mol in enumerate(mols[:num_molecules]):
        split = "test" if i < int(num_molecules * test_fraction) else "train"
        # a randomized (non-canonical) SMILES in the question, so canonicalization is a task
        shown = Chem.MolToSmiles(mol, doRandom=True, canonical=False)
        for task, (question, tag, out) in TEMPLATES.items():
            ans = answer(task, mol)
            rows.append({
                "sample_id": len(rows),
                "task": task,
                "split": split,
                "input": question.format(smiles=shown),
                "output": out.format(answer=ans),
                "raw_input": shown,
                "raw_output": ans,
                "input_core_tag_left": "<SMILES>",
                "input_core_tag_right": "</SMILES>",
                "output_core_tag_left": tag,
                "output_core_tag_right": CLOSE[tag],
                "target": None,
            })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default = Path(__file__).resolve().parent.parent / "client_apps" / "data" / "chem_demo.jsonl"
    parser.add_argument("--out", type=Path, default=default)
    parser.add_argument("--molecules", type=int, default=500)
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()
    rows = generate(args.molecules, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    with open(tmp, "w") as fh:
        for row in rows:
            fh.write(json.dumps(row, sort_keys=True) + "\n")
    os.replace(tmp, args.out)
    print(f"wrote {len(rows)} samples to {args.out} ({args.out.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
