"""Every strategy through HPCGrid, checked against a reference computed on the same replies."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import in_process_federation
from safetensors import safe_open
from safetensors.numpy import load_file

FAST = ("strategy.num_rounds=2 train.local_steps=3 evaluate.federated=false "
        "evaluate.central=false output.save_client_updates=true")


def _global(run_dir, r) -> dict[str, np.ndarray]:
    return load_file(str(run_dir / "global" / f"round-{r}" / "adapter_model.safetensors"))


def _updates(run_dir, r) -> list[tuple[dict[str, np.ndarray], float]]:
    out = []
    for path in sorted((run_dir / "updates" / f"round-{r}").glob("*.safetensors")):
        with safe_open(str(path), "numpy") as fh:
            n = float(fh.metadata()["num-examples"])
        out.append((load_file(str(path)), n))
    return out


def _weighted_mean(updates) -> dict[str, np.ndarray]:
    total = sum(n for _, n in updates)
    return {k: sum(u[k].astype(np.float64) * n for u, n in updates) / total
            for k in updates[0][0]}


def reference(name: str, s: dict, x0: dict, rounds: list) -> dict[str, np.ndarray]:
    """Flower's update rules, written out (FedOpt family: Reddi et al. 2021)."""
    x = {k: v.astype(np.float64) for k, v in x0.items()}
    m = {k: np.zeros_like(v) for k, v in x.items()}
    v = {k: np.zeros_like(a) for k, a in x.items()}
    momentum = None
    for r, updates in enumerate(rounds, start=1):
        avg = _weighted_mean(updates)
        if name in ("fedavg", "fedprox"):
            x = avg
            continue
        if name == "fedavgm":
            grad = {k: x[k] - avg[k] for k in x}
            momentum = grad if momentum is None else {
                k: s["server_momentum"] * momentum[k] + grad[k] for k in x}
            x = {k: x[k] - s["server_learning_rate"] * momentum[k] for k in x}
            continue
        delta = {k: avg[k] - x[k] for k in x}
        b1 = 0.0 if name == "fedadagrad" else s["beta_1"]
        m = {k: b1 * m[k] + (1 - b1) * delta[k] for k in x}
        if name == "fedadam":
            v = {k: s["beta_2"] * v[k] + (1 - s["beta_2"]) * delta[k] ** 2 for k in x}
            eta = s["eta"] * np.sqrt(1 - s["beta_2"] ** (r + 1)) / (1 - s["beta_1"] ** (r + 1))
        elif name == "fedyogi":
            v = {k: v[k] - (1 - s["beta_2"]) * delta[k] ** 2 * np.sign(v[k] - delta[k] ** 2)
                 for k in x}
            eta = s["eta"]
        else:  # fedadagrad
            v = {k: v[k] + delta[k] ** 2 for k in x}
            eta = s["eta"]
        x = {k: x[k] + eta * m[k] / (np.sqrt(v[k]) + s["tau"]) for k in x}
    return x


@pytest.mark.parametrize("name", ["fedavg", "fedprox", "fedadam", "fedyogi", "fedadagrad",
                                  "fedavgm"])
def test_strategy_aggregate_matches_reference(run_lora_job, name):
    status, run_dir, rows = run_lora_job(f"strategy={name} {FAST}",
                                         federation=in_process_federation())
    assert status == "finished:completed", (run_dir / "log.txt").read_text()[-3000:]
    assert [r["strategy"] for r in rows] == [name] * 3
    job = json.loads((run_dir / "job.json").read_text())
    rounds = [_updates(run_dir, r) for r in (1, 2)]
    assert [len(u) for u in rounds] == [2, 2]
    x0 = _global(run_dir, 0)
    assert set(rounds[0][0][0]) == set(x0)
    expected = reference(name, job["strategy"], x0, rounds)
    got = _global(run_dir, 2)
    for k in x0:
        np.testing.assert_allclose(got[k], expected[k], atol=1e-6, rtol=0, err_msg=k)
    # the run really moved the adapter (a reference of "nothing happened" would also match)
    assert max(float(np.abs(got[k] - x0[k]).max()) for k in x0) > 1e-4


def test_central_dp_clips_every_update_before_noise(run_lora_job):
    clip = 1e-3
    status, run_dir, rows = run_lora_job(
        f"dp=central-server dp.noise_multiplier=0 dp.clipping_norm={clip} {FAST}",
        federation=in_process_federation())
    assert status == "finished:completed", (run_dir / "log.txt").read_text()[-3000:]
    x0, updates = _global(run_dir, 0), _updates(run_dir, 1)
    clipped = []
    for u, n in updates:
        delta = {k: u[k].astype(np.float64) - x0[k] for k in x0}
        norm = np.sqrt(sum(float((d ** 2).sum()) for d in delta.values()))
        assert norm > 10 * clip  # so clipping is what shapes the result
        clipped.append(({k: x0[k] + d * min(1.0, clip / norm) for k, d in delta.items()}, n))
    expected = _weighted_mean(clipped)
    got = _global(run_dir, 1)
    for k in x0:
        np.testing.assert_allclose(got[k], expected[k], atol=1e-7, rtol=0, err_msg=k)
    step = np.sqrt(sum(float(((got[k] - x0[k]) ** 2).sum()) for k in x0))
    assert step <= clip * (1 + 1e-4)
    assert rows[1]["dp"] == "central-server" and rows[1]["clipping_norm"] == clip


@pytest.mark.parametrize("kind", ["central-server", "central-client"])
def test_central_dp_reports_growing_epsilon(run_lora_job, kind):
    clip = 1e-3
    status, run_dir, rows = run_lora_job(
        f"dp={kind} dp.noise_multiplier=2.0 dp.clipping_norm={clip} {FAST}",
        federation=in_process_federation())
    assert status == "finished:completed", (run_dir / "log.txt").read_text()[-3000:]
    eps = [r["epsilon"] for r in rows[1:]]
    assert all(e is not None and 0 < e < float("inf") for e in eps)
    assert eps[1] > eps[0]
    assert rows[1]["noise_multiplier"] == 2.0 and rows[1]["delta"] == 1e-5
    # client-side clipping (Flower's fixedclipping_mod) sends clipped updates; with
    # server-side clipping the clients' raw updates arrive and the server clips them
    x0 = _global(run_dir, 0)
    for u, _ in _updates(run_dir, 1):
        norm = np.sqrt(sum(float(((u[k].astype(np.float64) - x0[k]) ** 2).sum()) for k in x0))
        if kind == "central-client":
            assert norm <= clip * (1 + 1e-4)
        else:
            assert norm > 10 * clip


def test_too_few_nodes_fails_at_start_naming_the_key(run_lora_job):
    status, run_dir, rows = run_lora_job(f"strategy.min_train_nodes=5 {FAST}",
                                         federation=in_process_federation())
    assert status == "finished:failed"
    log = (run_dir / "log.txt").read_text()
    assert "strategy.min_train_nodes" in log and "federation has 2" in log
    assert rows == []
