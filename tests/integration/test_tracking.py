"""Tracking where users already look (#18): each tracker's files, read back with that
library's own reader, hold every round's metrics and the per-site timing breakdown of
``metrics.jsonl``; every saved adapter has a filled-in model card; `flwr-hpc report` (#19)
draws the run and summarizes it with the numbers of its records."""

from __future__ import annotations

import glob
import json

import pytest
from helpers import in_process_federation

JOB = ("strategy.num_rounds=2 train.local_steps=2 evaluate.max_generate=2 "
       "evaluate.federated=false")


def _rows(run_dir) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _expected(rows: list[dict]) -> dict[str, dict[int, float]]:
    """What every tracker must hold, from metrics.jsonl: {name: {round: value}}."""
    out: dict[str, dict[int, float]] = {}
    for r in rows:
        named = {"eval/loss": r["eval_loss"], "eval/exact_match": r["exact_match"],
                 "round/time_s": r["round_time_s"], "bytes/sent": r["bytes_sent"]}
        if r["train_loss"] is not None:
            named["train/loss"] = r["train_loss"]
        for site, fields in r["sites"].items():
            for key, value in fields.items():
                named[f"site/{site}/{key}"] = value
        for key, value in named.items():
            out.setdefault(key, {})[r["round"]] = float(value)
    return out


def _read_tensorboard(run_dir) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def _read_mlflow(run_dir) -> dict[str, dict[int, float]]:
    import os

    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"file://{run_dir / 'mlruns'}")
    (run,) = client.search_runs([client.get_experiment_by_name("flwr-hpc").experiment_id])
    assert run.info.run_name == f"run-{run_dir.name}" and run.info.status == "FINISHED"
    assert run.data.params["strategy.name"] == "fedavg"
    assert run.data.params["train.local_steps"] == "2"
    return {key: {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}
            for key in run.data.metrics}


def _read_wandb(run_dir) -> dict[str, dict[int, float]]:
    from wandb.proto import wandb_internal_pb2
    from wandb.sdk.internal import datastore

    (path,) = glob.glob(str(run_dir / "wandb" / "offline-run-*" / "run-*.wandb"))
    store = datastore.DataStore()
    store.open_for_scan(path)
    out: dict[str, dict[int, float]] = {}
    config = {}
    while (data := store.scan_data()) is not None:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        kind = record.WhichOneof("record_type")
        if kind == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json)
                     for i in record.history.item}
            step = int(items.pop("_step"))
            for key, value in items.items():
                if not key.startswith("_"):
                    out.setdefault(key, {})[step] = float(value)
        elif kind in ("run", "config"):  # the run's config, and later updates to it
            update = record.run.config.update if kind == "run" else record.config.update
            config.update({i.key: json.loads(i.value_json) for i in update})
    assert config["strategy.name"] == "fedavg"
    return out


READERS = {"tensorboard": _read_tensorboard, "mlflow": _read_mlflow, "wandb": _read_wandb}


@pytest.mark.slow(45)
def test_trackers_model_cards_and_report_of_one_run(run_lora_job, monkeypatch, tmp_path):
    """One DP run with all three trackers (a list is allowed): each library's reader finds
    every number of metrics.jsonl; every saved adapter has a filled-in model card."""
    monkeypatch.delenv("WANDB_MODE", raising=False)  # offline: nothing leaves the machine
    status, run_dir, rows = run_lora_job(
        f"{JOB} output.tracker=[tensorboard,mlflow,wandb] dp=opacus dp.noise_multiplier=1.0",
        federation=in_process_federation())
    assert status == "finished:completed", (run_dir / "log.txt").read_text()[-3000:]
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert set(rows[1]["sites"]) == {"a"} and rows[1]["sites"]["a"]["tasks"] == 2.0
    assert rows[1]["sites"]["a"]["run_s"] > 0

    expected = _expected(rows)
    expected["privacy/epsilon"] = {r["round"]: r["epsilon"] for r in rows[1:]}
    for tracker, read in READERS.items():
        got = read(run_dir)
        for key, by_round in expected.items():
            assert key in got, (tracker, key, sorted(got))
            assert got[key] == pytest.approx(by_round, rel=1e-6), (tracker, key)
        assert got["site/a/queue_wait_s"].keys() == {1, 2}, tracker

    job = json.loads((run_dir / "job.json").read_text())
    for r in rows:
        card = (run_dir / "global" / f"round-{r['round']}" / "README.md").read_text()
        assert "Provide a quick summary" not in card  # not peft's blank template
        assert card.startswith("---\nlibrary_name: peft\nbase_model: tiny_llama\n")
        assert f"round {r['round']} of 2 (flwr-hpc run {run_dir.name})" in card
        assert "| strategy | fedavg |" in card and "chem_demo" in card
        assert f"| eval_loss (server, held-out split) | {r['eval_loss']:.4f} |" in card
        assert f"r={job['model']['lora']['r']}" in card
        if r["round"] > 0:
            assert f"opacus: epsilon {r['epsilon']:.4f}, delta 1e-05" in card, card
    assert "privacy     opacus: epsilon" in (run_dir / "log.txt").read_text()

    # flwr-hpc report: figures (PNG + SVG, byte-identical when drawn again) and a summary
    from helpers import cli

    res = cli("flwr-hpc", "report", str(run_dir), "--out", str(tmp_path / "report"))
    assert res.returncode == 0, res.stderr
    _check_report(run_dir, tmp_path / "report", rows)
    again = cli("flwr-hpc", "report", str(run_dir), "--out", str(tmp_path / "again"))
    assert again.returncode == 0, again.stderr
    for path in sorted((tmp_path / "report").iterdir()):
        assert (tmp_path / "again" / path.name).read_bytes() == path.read_bytes(), path.name


def _check_report(run_dir, out, rows) -> None:
    import matplotlib.image

    run = run_dir.name
    names = {p.name for p in out.iterdir()}
    for fig in ("eval_vs_round", "eval_vs_clock", f"sites-{run}", "bytes", "failures"):
        assert {f"{fig}.png", f"{fig}.svg"} <= names, (fig, names)
        height, width, _ = matplotlib.image.imread(out / f"{fig}.png").shape
        assert width >= 400 and height >= 300, (fig, width, height)
    summary = (out / "summary.md").read_text()
    tasks = [json.loads(x) for x in (run_dir / "tasks.jsonl").read_text().splitlines()]
    first, last = rows[0]["eval_loss"], rows[-1]["eval_loss"]
    best = min(r["eval_loss"] for r in rows)
    line = next(ln for ln in summary.splitlines() if ln.startswith(f"| {run} |"))
    assert f"| finished/completed | 2 | {first:.4f} → {last:.4f} ({best:.4f}) |" in line
    assert f"| {sum(r['bytes_sent'] for r in rows)} B |" in line
    assert f"| {sum(r['bytes_received'] for r in rows)} B |" in line
    bad = sum(t["outcome"] != "ok" for t in tasks)
    assert line.endswith(f"| a {bad} |"), line
