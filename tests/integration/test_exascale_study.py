"""The exascale study in miniature (#19): `benchmarks/exascale.py --quick` runs all three
parts for real (transport bench with a base-sized model's layout; federated runs of the
classifier through the runner) and its tables, fits and claims agree with its records."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys

import pytest
from helpers import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
import exascale  # noqa: E402


def test_linear_fit_recovers_a_line_and_scores_scatter():
    fit = exascale.linear_fit([2, 8, 32, 96], [0.5 + 0.25 * n for n in (2, 8, 32, 96)])
    assert fit["slope_s_per_client"] == pytest.approx(0.25)
    assert fit["intercept_s"] == pytest.approx(0.5)
    assert fit["r2"] == pytest.approx(1.0)
    noisy = exascale.linear_fit([1, 2, 3, 4], [1.0, 3.0, 2.0, 4.0])
    assert noisy["slope_s_per_client"] == pytest.approx(0.8)
    assert noisy["r2"] == pytest.approx(0.64)


def test_local_steps_keep_about_one_epoch_per_round():
    # 360 molecules, batch 16: the federation makes ~23 steps per round at any size
    assert [exascale.local_steps(n, 16) for n in (2, 4, 8, 16)] == [12, 6, 3, 2]


def test_convergence_compares_plateaus_not_one_noisy_round():
    early = [0.5] * 10 + [0.8, 0.9] * 5  # last 10 rounds: mean 0.85, last round 0.9
    late = [0.475] * 14 + [0.8, 0.85, 0.85, 0.8, 0.85, 0.8]
    assert exascale.plateau(early) == 0.85
    assert exascale.plateau(late) == 0.685
    assert exascale.plateau([0.7, 0.8]) == 0.75  # shorter than the tail: all of it
    acc = {"rounds": 5, "clients": [2, 16],
           "summary": {"m": {"2": {"mean": 0.8}, "16": {"mean": 0.5}, "range_of_means": 0.3,
                             "mean_within_std": 0.01}}}

    def claim(runs):
        conv = {"model": "m", "rounds": 20, "runs": runs}
        return exascale.claims({"accuracy": acc, "convergence": conv})[0]

    text = claim([{"clients": 2, "accuracy": 0.9, "accuracy_by_round": early},
                  {"clients": 16, "accuracy": 0.8, "accuracy_by_round": late}])
    assert "2 clients 0.850, 16 clients 0.685 (gap 0.165: NOT stable" in text
    text = claim([{"clients": 2, "accuracy": 0.9, "accuracy_by_round": early},
                  {"clients": 16, "accuracy": 0.8, "accuracy_by_round": list(early)}])
    assert "(gap 0.000: stable once trained to convergence" in text
    md = exascale.format_markdown({"convergence": {
        "model": "m", "rounds": 20, "batch": 16,
        "runs": [{"clients": 2, "local_steps": 12, "accuracy_by_round": [0.0] + early}]}})
    assert "| 2 | 12 | 0.500 | 0.500 | 0.500 | 0.500 | 0.800 | 0.900 | 0.850 |" in md


def test_base_sized_layouts_are_the_published_sizes():
    full = {a: sum(exascale.layout(a, "full")) for a in exascale.ARCHS}
    # albert-base-v2 11.7M, bert-base-uncased 109.5M, deberta-v3-base 184.4M (+ a 2-way head)
    assert full == {"ALBERT-base": 11_685_122, "BERT-base": 109_483_778,
                    "DeBERTa-base": 184_423_682}
    lora = sum(exascale.layout("BERT-base", "lora"))
    assert lora == 12 * 2 * (768 * 8 + 8 * 768) + 768 * 2 + 2  # q, v per layer + head


@pytest.mark.slow(120)
def test_quick_study_measures_all_three_parts(tmp_path):
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / "exascale.py"),
                          "--quick", "--out", str(out), "--workdir", str(tmp_path / "work")],
                         capture_output=True, text=True, timeout=900,
                         stdin=subprocess.DEVNULL)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads((out / "exascale.json").read_text())
    md = (out / "exascale.md").read_text()

    # (a) communication: every point measured, the full model costs more than its adapter
    comm = result["comm"]
    points = {(p["exchange"], p["clients"]): p for p in comm["points"]}
    assert set(points) == {("full", 2), ("full", 4), ("lora", 2), ("lora", 4)}
    assert comm["sizes"]["ALBERT-base/full"]["mb"] == pytest.approx(11_685_122 * 4 / 2**20,
                                                                      abs=1e-3)
    for n in (2, 4):
        assert 0 < points[("lora", n)]["round_s"] < points[("full", n)]["round_s"]
        assert points[("full", n)]["round_s"] == statistics.median(
            points[("full", n)]["rounds_s"][1:])
    fit = comm["fits"]["ALBERT-base/full"]
    again = exascale.linear_fit([2, 4], [points[("full", 2)]["round_s"],
                                         points[("full", 4)]["round_s"]])
    assert fit["slope_s_per_client"] == pytest.approx(again["slope_s_per_client"], abs=1e-5)
    assert f"| ALBERT-base | full | 44.58 | {points[('full', 2)]['round_s']:.3f} |" in md

    # (b) accuracy: one run per partition and client count; the summary is their mean
    acc = result["accuracy"]
    assert {(r["clients"], r["partition"]) for r in acc["runs"]} == {
        (2, "iid"), (2, "dirichlet(0.1)"), (4, "iid"), (4, "dirichlet(0.1)")}
    for n in (2, 4):
        values = [r["accuracy"] for r in acc["runs"] if r["clients"] == n]
        assert acc["summary"]["tiny_bert"][str(n)]["mean"] == pytest.approx(
            statistics.fmean(values), abs=1e-4)
        assert all(0.0 <= v <= 1.0 for v in values)
    assert {r["local_steps"] for r in acc["runs"] if r["clients"] == 4} == {6}

    # tables: dropout lost tasks for real, DP spent the budget it was given
    tab = result["tables"]
    lost = {r["dropout"]: r["lost_tasks"] for r in tab["dropout"]}
    assert lost[0.0] == 0 and lost[0.5] >= 1, lost
    (private,) = [r for r in tab["dp"] if r["epsilon"] == 8.0]
    assert 7.0 < private["epsilon_spent"] <= 8.0 + 1e-6
    (public,) = [r for r in tab["dp"] if r["epsilon"] == "none"]
    assert public["epsilon_spent"] is None
    assert "### The study's claims next to ours" in md and md.count("\n1. ") == 1

    from PIL import Image

    for name in ("exascale_comm", "exascale_accuracy"):
        with Image.open(out / f"{name}.png") as img:
            assert img.size[0] >= 500 and img.size[1] >= 300
        assert (out / f"{name}.svg").read_text().startswith("<?xml")
