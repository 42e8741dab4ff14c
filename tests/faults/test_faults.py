"""Fault injection: each fault, what the system does, and that nothing bad is aggregated.

The README's fault table lists these tests (and the older ones in test_grid.py,
test_payload.py, test_globus_compute.py and test_globus_transfer.py)."""

from __future__ import annotations

import errno
import re

import fault_workers
import numpy as np
import pytest
from flwr.app import ArrayRecord
from flwr.common.constant import ErrorCode
from helpers import fed_of, read_tasks, train_messages

from flwr_hpc.payload.store import FilesystemStore


def _by_node(replies):
    return {r.metadata.src_node_id: r for r in replies}


def test_a_killed_worker_is_reported_and_its_site_keeps_serving(grid_factory, monkeypatch):
    monkeypatch.setenv("FLWR_HPC_TEST_CRASH_SITE", "b")
    grid = grid_factory(fed_of({"a": 1, "b": 2}), _worker_fn=fault_workers.crash_first_task)
    replies = list(grid.send_and_receive(train_messages(grid, 1), timeout=120))
    by_site: dict[str, list] = {}
    for r in replies:
        by_site.setdefault(grid._nodes[r.metadata.src_node_id].site, []).append(r)
    assert not any(r.has_error() for r in by_site["a"])  # other sites are not affected
    # a process pool loses the tasks in flight with the dead worker (one site's pool)
    crashed = [r for r in by_site["b"] if r.has_error()]
    assert crashed and all(r.error.code == ErrorCode.CLIENT_APP_CRASHED for r in crashed)
    assert all("site 'b'" in r.error.reason for r in crashed)
    assert {t["outcome"] for t in grid.task_log.records if t["site"] == "b"} <= {
        "ok", "error:CLIENT_APP_CRASHED"}
    # the lost worker is replaced: the next round has every node back
    again = list(grid.send_and_receive(train_messages(grid, 2), timeout=120))
    assert len(again) == 3 and not any(r.has_error() for r in again)


def test_a_worker_started_while_its_pool_breaks_does_not_outlive_the_site(
        grid_factory, monkeypatch):
    """When a worker dies, its process pool terminates the workers it has registered; a
    worker the pool was starting at that moment (registered after the terminations: the
    order a loaded machine produces, seen in CI as a worker left running) is never
    terminated and would wait for tasks for ever. That state is made here: a live worker
    process registered in the broken pool. The backend stops it when it replaces the pool.
    """
    import time

    import psutil
    from helpers import child_python_processes

    monkeypatch.setenv("FLWR_HPC_TEST_CRASH_SITE", "b")
    grid = grid_factory(fed_of({"a": 1, "b": 2}), _worker_fn=fault_workers.crash_first_task)
    replies = list(grid.send_and_receive(train_messages(grid, 1), timeout=120))
    assert len(replies) == 3
    broken = grid.sites["b"].backend._engine.executor
    assert broken._broken  # the crash broke site b's pool
    late = broken._mp_context.Process(target=time.sleep, args=(3600,), daemon=False)
    late.start()
    broken._processes[late.pid] = late  # registered after the pool terminated its workers
    again = list(grid.send_and_receive(train_messages(grid, 2), timeout=120))
    assert len(again) == 3 and not any(r.has_error() for r in again)
    # replacing the pool stopped the late worker
    assert not psutil.pid_exists(late.pid) or psutil.Process(late.pid).status() == "zombie"
    grid.close()
    assert child_python_processes() == []


def test_an_offline_endpoint_sits_out_a_round_and_rejoins(cloud, grid_factory, monkeypatch):
    from flwr_hpc.compute import globus as gc
    from flwr_hpc.config import FederationConfig

    monkeypatch.setattr(gc, "STATUS_TTL_S", 0.0)
    fed = FederationConfig.from_dict({"name": "g", "sites": {
        name: {"compute": {"type": "globus", "endpoint_id": cloud.add_endpoint()}}
        for name in ("up", "flaky")}})
    grid = grid_factory(fed)
    flaky = fed.site("flaky").compute["endpoint_id"]
    cloud.set_status(flaky, "offline")
    first = list(grid.send_and_receive(train_messages(grid, 1), timeout=60))
    codes = sorted((grid._nodes[r.metadata.src_node_id].site, r.error.code if r.has_error()
                    else 0) for r in first)
    assert codes == [("flaky", ErrorCode.NODE_UNAVAILABLE), ("up", 0)]
    cloud.set_status(flaky, "online")
    second = list(grid.send_and_receive(train_messages(grid, 2), timeout=60))
    assert len(second) == 2 and not any(r.has_error() for r in second)


def test_disk_full_while_staging_fails_that_site_only_and_leaves_no_partial_object(
        grid_factory, monkeypatch):
    grid = grid_factory(fed_of({"a": 1, "full": 1}, engine="thread-pool"))
    from flwr_hpc.payload import store as store_module

    full_root = str(grid.sites["full"].store.root)
    real_open = open

    class FullDisk:
        """A file on a full disk: the first write gets 100 bytes out, then ENOSPC."""

        def __init__(self, fh):
            self.fh = fh

        def write(self, data):
            self.fh.write(bytes(memoryview(data).cast("B")[:100]))
            raise OSError(errno.ENOSPC, "No space left on device")

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

    def full_open(path, *args, **kwargs):
        fh = real_open(path, *args, **kwargs)
        return FullDisk(fh) if str(path).startswith(full_root) else fh

    monkeypatch.setattr(store_module, "open", full_open, raising=False)
    replies = list(grid.send_and_receive(train_messages(grid, 1), timeout=60))
    by_site = {grid._nodes[r.metadata.src_node_id].site: r for r in replies}
    assert not by_site["a"].has_error()
    assert by_site["full"].error.code == ErrorCode.MESSAGE_UNAVAILABLE
    assert "No space left" in by_site["full"].error.reason
    objects = grid.sites["full"].store.objects_dir
    assert [p for p in objects.rglob("*") if p.is_file()] == []  # nothing half-written
    monkeypatch.delattr(store_module, "open")  # space freed: the site is staged again
    again = list(grid.send_and_receive(train_messages(grid, 2), timeout=60))
    assert len(again) == 2 and not any(r.has_error() for r in again)
    store = FilesystemStore(full_root)
    assert all(store.get(p.name) for p in objects.rglob("*") if p.is_file())


@pytest.mark.parametrize("kinds", [
    "0:no-weight,1:nan,2:shape",
    "0:zero-weight,1:two-arrays,2:metric-keys",
])
def test_unusable_replies_become_node_errors_and_the_rest_aggregate(grid_factory,
                                                                     monkeypatch, kinds):
    from flwr.serverapp.strategy import FedAvg
    from flwr.serverapp.strategy.strategy_utils import InconsistentMessageReplies

    from flwr_hpc.strategy.rounds import start

    monkeypatch.setenv("FLWR_HPC_TEST_BAD", kinds)
    grid = grid_factory(fed_of({"a": 5}, engine="thread-pool"),
                        _worker_fn=fault_workers.bad_reply)
    initial = ArrayRecord([np.zeros(4, dtype=np.float32)])
    # Flower's own loop stops the whole run on the first such reply
    with pytest.raises(InconsistentMessageReplies):
        FedAvg(fraction_evaluate=0.0).start(grid=grid, initial_arrays=initial, num_rounds=1)
    from flwr_hpc.strategy.streaming import StreamingFedAvg

    for strategy in (FedAvg(fraction_evaluate=0.0), StreamingFedAvg(fraction_evaluate=0.0)):
        result = start(strategy, grid, initial, num_rounds=1, run_dir=None)
        # only partitions 3 and 4 were well-formed: the global model is their weighted
        # mean (quickstart: new = global + N(0, 0.01) + partition + 1, weight 10 (p + 1));
        # a streaming strategy also keeps a reply whose only fault is an extra metric key
        # (it aggregates the metric keys all replies share)
        streams = getattr(strategy, "streaming", False)
        used = [3, 4] + ([2] if "metric-keys" in kinds and streams else [])
        weights = {p: 10 * (p + 1) for p in used}
        total = sum(weights.values())
        (got,) = result.arrays.to_numpy_ndarrays()
        assert np.allclose(got, sum(w * (p + 1) for p, w in weights.items()) / total,
                           atol=0.05), got
        assert result.train_metrics_clientapp[1]["partition-id"] == pytest.approx(
            sum(w * p for p, w in weights.items()) / total)


def test_a_stale_reply_is_rejected_not_aggregated(grid_factory):
    grid = grid_factory(fed_of({"a": 1}, engine="thread-pool"),
                        _worker_fn=fault_workers.stale_reply)
    (first,) = grid.send_and_receive(train_messages(grid, 1), timeout=60)
    assert not first.has_error()
    (second,) = grid.send_and_receive(train_messages(grid, 2), timeout=60)
    assert second.has_error() and second.error.code == ErrorCode.REPLY_MESSAGE_UNAVAILABLE
    assert "answers message" in second.error.reason
    assert read_tasks(grid.task_log.path.parent)[-1]["outcome"] == (
        "error:REPLY_MESSAGE_UNAVAILABLE")


@pytest.mark.parametrize("bad", ["../../../../etc/passwd", "a" * 63 + "/", "A" * 64,
                                 "0" * 64 + "\x00"])
def test_path_traversal_object_ids_are_refused_at_the_site(tmp_path, bad):
    from flwr_hpc.worker import JOB_VERSION, run_task

    (tmp_path / "store").mkdir()
    job = {"v": JOB_VERSION, "run_id": 1, "node_id": 2, "site": "a", "message_id": bad,
           "context_id": "0" * 64, "fab_hash": "0" * 64, "apps_dir": str(tmp_path / "apps"),
           "store": {"type": "filesystem", "path": str(tmp_path / "store")}}
    result = run_task(job)
    assert not result["ok"] and result["error_code"] == ErrorCode.MESSAGE_UNAVAILABLE
    assert "invalid object id" in result["reason"]
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["objects", "store"]


def test_a_restricted_site_refuses_an_unlisted_fab(grid_factory, monkeypatch,
                                                    quickstart_fab):
    from flwr.cli.config_utils import get_fab_metadata

    from flwr_hpc.payload.objects import sha256_hex

    fab_id, _ = get_fab_metadata(quickstart_fab)
    monkeypatch.setenv("FLWR_HPC_ALLOWED_FABS", "0" * 64 + ", someone-else/*")
    grid = grid_factory(fed_of({"a": 1}, engine="thread-pool"))
    (reply,) = grid.send_and_receive(train_messages(grid, 1), timeout=60)
    assert reply.error.code == ErrorCode.LOAD_CLIENT_APP_EXCEPTION
    assert "does not run FAB" in reply.error.reason and fab_id in reply.error.reason
    assert "FLWR_HPC_ALLOWED_FABS" in reply.error.reason
    apps = grid.sites["a"].apps_dir
    assert not apps.exists() or not list(apps.rglob(".flwr-hpc-fab"))  # nothing installed
    # names (which any FAB can claim) admit only where the site says names are enough
    for allowed, by_name in ((sha256_hex(quickstart_fab), ""),
                             (f"{fab_id.split('/')[0]}/*", "1"), (fab_id, "1")):
        monkeypatch.setenv("FLWR_HPC_ALLOWED_FABS", allowed)
        monkeypatch.setenv("FLWR_HPC_ALLOW_FABS_BY_NAME", by_name)
        (ok,) = grid.send_and_receive(train_messages(grid, 2), timeout=60)
        assert not ok.has_error(), ok.error.reason


def test_a_run_in_which_every_task_failed_is_failed_not_completed(run_quickstart, monkeypatch):
    """Every site refuses the FAB: the app ends normally, but nothing ran anywhere."""
    monkeypatch.setenv("FLWR_HPC_ALLOWED_FABS", "0" * 64)
    status, run_dir, _ = run_quickstart()
    assert status == "finished:failed"
    from flwr_hpc.server.runs import read_status

    details = read_status(run_dir)["details"]
    assert details.startswith("no task succeeded at any site (")
    assert "error:LOAD_CLIENT_APP_EXCEPTION" in details and "does not run FAB" in details
    assert {t["outcome"] for t in read_tasks(run_dir)} == {"error:LOAD_CLIENT_APP_EXCEPTION"}


def test_the_lora_job_fails_when_rounds_train_nothing(run_lora_job, monkeypatch):
    """No site can run the FAB: after max_failed_rounds (3) rounds that trained nothing the
    run fails with the sites' reason, and no untrained adapter is announced as final."""
    monkeypatch.setenv("FLWR_HPC_ALLOWED_FABS", "0" * 64)
    status, run_dir, rows = run_lora_job(
        "strategy.num_rounds=6 train.local_steps=1 evaluate.max_generate=0 "
        "evaluate.central=false")
    assert status == "finished:failed"
    from flwr_hpc.server.runs import read_status

    details = read_status(run_dir)["details"]
    assert "RoundsFailed: 3 round(s) in a row up to round 3 trained nothing" in details
    assert "does not run FAB" in details
    log = (run_dir / "log.txt").read_text()
    # no closing summary, no adapter announced
    assert not re.search(r"run \d+: \d+ round\(s\) in ", log) and "  adapter  " not in log
    assert "[round 1] trained nothing" in log
    assert [r["round"] for r in rows] == [0, 1, 2]  # round 3 failed the run before its row


def test_injected_dropout_loses_seeded_tasks_as_node_unavailable(run_quickstart):
    """faults.dropout (the exascale study's client dropout) on one site: its tasks are lost
    before they run, as NODE_UNAVAILABLE, in a seeded pattern; the run goes on."""
    import random

    status, run_dir, summary = run_quickstart(
        {"num-server-rounds": 3}, overrides=["federation.sites.beta.faults.dropout=0.5",
                                             "federation.sites.beta.faults.seed=3"])
    assert status == "finished:completed"
    tasks = read_tasks(run_dir)
    beta = [t for t in tasks if t["site"] == "beta"]
    assert len(beta) == 2 * 2 * 3  # 2 clients x (train + evaluate) x 3 rounds
    rng = random.Random("3:beta")  # one draw per task submitted to beta
    expected = sum(rng.random() < 0.5 for _ in beta)
    lost = [t for t in tasks if t["outcome"] != "ok"]
    assert 0 < expected < len(beta) and len(lost) == expected
    assert all(t["site"] == "beta" and t["outcome"] == "error:NODE_UNAVAILABLE"
               and "fault injection: site 'beta' lost node" in t["error"] for t in lost)
    assert all(t["run_s"] is None for t in lost)  # lost before running
    assert summary is not None and len(summary["train_metrics"]) == 3
