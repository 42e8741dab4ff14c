"""HPCGrid driven by a real Flower ServerApp (FedAvg) through the runner, and directly."""

from __future__ import annotations

import json
import re

import pytest
from flwr.common.constant import ErrorCode
from helpers import child_python_processes, read_tasks
from helpers import fed_of as _fed
from helpers import train_messages as _train_messages

from flwr_hpc.config import load_federation


def test_three_rounds_fedavg_with_persistent_state(run_quickstart):
    status, run_dir, summary = run_quickstart({"num-server-rounds": 3})
    assert status == "finished:completed"
    fed = load_federation()
    assert summary["num_nodes"] == fed.num_clients == 4
    # every node saw its own context.state from the previous round
    seen = [summary["train_metrics"][r]["rounds-seen"] for r in ("1", "2", "3")]
    assert seen == pytest.approx([1, 2, 3])
    # all four partitions contributed: weighted mean of partition-id with weights 10*(p+1)
    assert summary["train_metrics"]["1"]["partition-id"] == pytest.approx(2.0)
    tasks = read_tasks(run_dir)
    assert len(tasks) == 3 * 2 * 4
    assert {t["outcome"] for t in tasks} == {"ok"}
    assert {t["site"] for t in tasks} == {"alpha", "beta", "gamma"}
    for t in tasks:
        for key in ("bytes_to_site", "bytes_from_site", "stage_s", "queue_wait_s", "run_s",
                    "fetch_s", "node_id", "phase", "round"):
            assert t[key] is not None, key
        assert t["queue_wait_s"] >= 0 and t["run_s"] >= 0
    status_json = json.loads((run_dir / "status.json").read_text())
    assert status_json["status"] == "finished" and status_json["sub_status"] == "completed"
    log = (run_dir / "log.txt").read_text()
    assert "[ROUND 3/3]" in log
    # log.txt lines carry a UTC timestamp (Flower's logger and flwr-hpc's alike)
    stamp = r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ INFO +"
    assert re.search(stamp + r"\[ROUND 3/3\]", log, re.M), log[:2000]
    assert re.search(stamp + r"run \d+: ", log, re.M), log[:2000]
    # progress lines per phase (submitted, replies), not one per task
    assert "tasks done" not in log
    for r in ("1", "2", "3"):
        assert len(re.findall(rf"\[round {r}\] train: 4/4 replies in ", log)) == 1, log


def test_model_crosses_to_a_site_once_per_round(run_quickstart):
    size_mb = 32
    fed = _fed({"big": 3})
    status, run_dir, summary = run_quickstart(
        {"num-server-rounds": 2, "model-size-mb": size_mb}, federation=fed)
    assert status == "finished:completed"
    tasks = read_tasks(run_dir)
    train = [t for t in tasks if t["phase"] == "train"]
    per_round = {r: sum(t["bytes_to_site"] for t in train if t["round"] == r) for r in ("1", "2")}
    model_bytes = size_mb * 2**20
    # round 1 carries the initial model once (+ FAB + contexts); ~32 MB, not ~96 MB
    assert model_bytes <= per_round["1"] < 1.05 * model_bytes
    # round 2's global model was already staged for round 1's evaluate phase
    evaluate_r1 = sum(t["bytes_to_site"] for t in tasks
                      if t["phase"] == "evaluate" and t["round"] == "1")
    assert model_bytes <= evaluate_r1 < 1.05 * model_bytes
    assert per_round["2"] < 0.01 * model_bytes


def test_raising_clientapp_becomes_error_reply_and_others_aggregate(run_quickstart):
    status, run_dir, summary = run_quickstart({"num-server-rounds": 2, "fail-partition": 1})
    assert status == "finished:completed"
    # partitions 0, 2, 3 aggregated with weights 10, 30, 40
    assert summary["train_metrics"]["1"]["partition-id"] == pytest.approx(180 / 80)
    failed = [t for t in read_tasks(run_dir) if t["outcome"] != "ok"]
    assert len(failed) == 2  # one per train round
    assert {t["outcome"] for t in failed} == {"error:CLIENT_APP_RAISED_EXCEPTION"}
    assert all("fails on purpose" in t["error"] for t in failed)


@pytest.mark.slow(21)
def test_task_past_deadline_is_dropped_and_late_result_discarded(run_quickstart):
    status, run_dir, summary = run_quickstart(
        # the deadline must exceed a cold start (4 spawned workers on 2 cores: ~7 s) and
        # fall well short of the sleeper
        {"num-server-rounds": 2, "sleep-partition": 0, "sleep-round": 1, "sleep-s": 16.0,
         "timeout-s": 12.0})
    assert status == "finished:completed"
    tasks = read_tasks(run_dir)
    node0 = [t for t in tasks if t["site"] == "alpha"]
    assert any(t["outcome"] == "timeout" and t["round"] == "1" and t["phase"] == "train"
               for t in node0)
    assert any(t["outcome"] == "late-discarded" for t in node0)
    # round 1 aggregated partitions 1, 2, 3 only (weights 20, 30, 40)
    assert summary["train_metrics"]["1"]["partition-id"] == pytest.approx(200 / 90)
    assert child_python_processes() == []


def test_grid_direct_partition_ids_state_and_metadata(grid_factory):
    grid = grid_factory(load_federation(), )
    nodes = list(grid.get_node_ids())
    assert len(nodes) == 4 and 1 not in nodes
    msgs = _train_messages(grid, 1)
    replies = list(grid.send_and_receive(msgs, timeout=120))
    assert len(replies) == 4
    by_node = {r.metadata.src_node_id: r for r in replies}
    assert set(by_node) == set(nodes)
    pids = sorted(int(r.content["metrics"]["partition-id"]) for r in replies)
    assert pids == [0, 1, 2, 3]
    assert {int(r.content["metrics"]["num-partitions"]) for r in replies} == {4}
    sent = {m.metadata.dst_node_id: m.metadata.message_id for m in msgs}
    for nid, r in by_node.items():
        assert r.metadata.reply_to_message_id == sent[nid]
        assert r.metadata.run_id == 4242
        assert r.metadata.dst_node_id == 1
        assert r.metadata.message_id == r.object_id
    replies2 = list(grid.send_and_receive(_train_messages(grid, 2), timeout=120))
    assert sorted(int(r.content["metrics"]["rounds-seen"]) for r in replies2) == [2, 2, 2, 2]
    assert int(grid.node_context(nodes[0]).state["history"]["rounds"]) == 2


def test_unknown_node_gets_node_unavailable(grid_factory):
    grid = grid_factory(_fed({"a": 1}, engine="thread-pool"))
    (reply,) = grid.send_and_receive(_train_messages(grid, 1, nodes=[123456789]), timeout=30)
    assert reply.has_error() and reply.error.code == ErrorCode.NODE_UNAVAILABLE


@pytest.mark.parametrize(("worker", "code"), [
    ("corrupt_reply", ErrorCode.REPLY_MESSAGE_UNAVAILABLE),
    ("corrupt_input", ErrorCode.MESSAGE_UNAVAILABLE),
])
def test_corrupted_payload_is_rejected_and_reported(grid_factory, worker, code):
    import fault_workers

    grid = grid_factory(_fed({"a": 1}), _worker_fn=getattr(fault_workers, worker))
    (reply,) = grid.send_and_receive(_train_messages(grid, 1), timeout=120)
    assert reply.has_error()
    assert reply.error.code == code
    assert "sha256" in reply.error.reason
    (record,) = grid.task_log.records
    names = {v: k for k, v in vars(ErrorCode).items() if k.isupper()}
    assert record["outcome"] == f"error:{names[code]}"
    quarantine = grid.sites["a"].store.root / "quarantine"
    assert len(list(quarantine.iterdir())) == 1
