"""The Globus Compute backend against an offline fake of the cloud (HTTP + AMQP edges only)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import responses
from helpers import read_tasks

from flwr_hpc.compute import globus as gc
from flwr_hpc.config import FederationConfig
from flwr_hpc.errors import ConfigError, GlobusServiceError, RemoteTaskError, WorkerLostError
from flwr_hpc.worker import run_task


def echo(job: dict) -> dict:
    """A site function (module level: shipped by reference)."""
    if job.get("fail"):
        raise ValueError("boom at the site")
    return {"echo": job["x"], "pad": len(job.get("pad", ""))}


def _backend(cloud, ep) -> gc.GlobusComputeBackend:
    return gc.GlobusComputeBackend("site-a", ep)


def test_round_trip_through_the_real_executor_is_fast(cloud):
    ep = cloud.add_endpoint()
    backend = _backend(cloud, ep)
    try:
        t0 = time.monotonic()
        futures = [backend.submit(echo, {"x": i}) for i in range(6)]
        assert [f.result(timeout=30)["echo"] for f in futures] == list(range(6))
        assert time.monotonic() - t0 < 10
        # sequential round trips stay flat: the client-side burst throttle is relaxed
        times = []
        for i in range(6):
            t = time.monotonic()
            backend.submit(echo, {"x": i}).result(timeout=30)
            times.append(time.monotonic() - t)
        assert max(times) < 2.0, times
        ex = backend._executor
        assert (ex.api_burst_limit, ex.api_burst_window_s) == (8, 1)
        # arguments travel as JSON, the function by reference
        task_body = cloud.submits[0]["body"]
        args_buf = next(iter(task_body["tasks"].values()))[0]
        assert "11\n" in args_buf and '"x": 0' in args_buf
        assert task_body["result_serializers"] == gc.RESULT_SERIALIZERS
    finally:
        backend.close()


def test_remote_exception_is_a_remote_task_error(cloud):
    backend = _backend(cloud, cloud.add_endpoint())
    try:
        with pytest.raises(RemoteTaskError, match="boom at the site"):
            backend.submit(echo, {"x": 1, "fail": True}).result(timeout=30)
    finally:
        backend.close()


def test_oversized_submit_poisons_the_executor_and_the_backend_rebuilds_it(cloud):
    backend = _backend(cloud, cloud.add_endpoint())
    try:
        big = backend.submit(echo, {"x": 1, "pad": "z" * 11_000_000})
        with pytest.raises(GlobusServiceError, match="TASK_PAYLOAD_TOO_LARGE"):
            big.result(timeout=30)
        first = backend._executor
        deadline = time.monotonic() + 10
        while not getattr(first, "_stopped_in_error", False) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert first._stopped_in_error  # the SDK's own behaviour: it refuses new work
        ok = backend.submit(echo, {"x": 2})
        assert ok.result(timeout=30)["echo"] == 2
        assert backend.rebuilds == 1 and backend._executor is not first
    finally:
        backend.close()


def test_result_over_the_endpoint_limit_is_an_error(cloud):
    backend = _backend(cloud, cloud.add_endpoint())
    try:
        with pytest.raises(RemoteTaskError, match="MaxResultSizeExceeded|exceeded"):
            backend.submit(big_result, {"x": 1}).result(timeout=60)
    finally:
        backend.close()


def big_result(job: dict) -> dict:
    return {"blob": "y" * (11 * 2**20)}


def slow(job: dict) -> dict:
    import time as _t

    _t.sleep(job["s"])
    return {"slept": job["s"]}


def test_result_watcher_death_fails_open_tasks_and_the_site_recovers(cloud):
    backend = _backend(cloud, cloud.add_endpoint(workers=2))
    try:
        # the task outlives the watcher's 3 reopen attempts in 3 s by a margin: with a
        # 3 s task a loaded machine could finish it first (seen once in CI)
        pending = backend.submit(slow, {"s": 10.0})
        deadline = time.monotonic() + 10
        while not cloud._queues and time.monotonic() < deadline:
            time.sleep(0.05)  # the watcher is consuming
        cloud.break_channels()
        with pytest.raises(WorkerLostError, match="Unable to sustain channel"):
            pending.result(timeout=30)
        assert backend.submit(echo, {"x": 7}).result(timeout=30)["echo"] == 7
    finally:
        backend.close()


def test_offline_endpoint_status_is_reported(cloud):
    ep = cloud.add_endpoint(status="offline")
    backend = _backend(cloud, ep)
    try:
        assert backend.status() == "offline"
    finally:
        backend.close()


def test_missing_credentials_fail_fast_naming_the_variables(monkeypatch, tmp_path):
    monkeypatch.delenv(gc.ENV_CLIENT_ID, raising=False)
    monkeypatch.delenv(gc.ENV_CLIENT_SECRET, raising=False)
    monkeypatch.setenv("GLOBUS_COMPUTE_USER_DIR", str(tmp_path))
    gc.set_shared_client(None)
    t0 = time.monotonic()
    with pytest.raises(GlobusServiceError, match="GLOBUS_COMPUTE_CLIENT_ID"):
        gc.shared_client()
    assert time.monotonic() - t0 < 2


def test_a_stale_token_store_is_no_login_and_never_prompts(monkeypatch, tmp_path):
    """An old ~/.globus_compute/storage.db (expired access token, no refresh token) made
    a credential-less run fall into the SDK's interactive login prompt."""
    from globus_compute_sdk.sdk.auth.token_storage import get_token_storage
    from globus_sdk.token_storage import TokenStorageData

    monkeypatch.delenv(gc.ENV_CLIENT_ID, raising=False)
    monkeypatch.delenv(gc.ENV_CLIENT_SECRET, raising=False)
    monkeypatch.setenv("GLOBUS_COMPUTE_USER_DIR", str(tmp_path))
    storage = get_token_storage()
    expired = TokenStorageData(resource_server="funcx_service", identity_id=None,
                               scope="all", access_token="old", refresh_token=None,
                               expires_at_seconds=int(time.time()) - 3600, token_type="Bearer")
    storage.store_token_data_by_resource_server({"funcx_service": expired})
    storage.close()
    assert (tmp_path / "storage.db").is_file()
    gc.set_shared_client(None)
    t0 = time.monotonic()
    with pytest.raises(GlobusServiceError, match="holds no usable login"):
        gc.shared_client()
    assert time.monotonic() - t0 < 5
    assert not gc.credentials_available()
    # a stored login with a refresh token is one
    storage = get_token_storage()
    storage.store_token_data_by_resource_server({"funcx_service": TokenStorageData(
        resource_server="funcx_service", identity_id=None, scope="all", access_token="a",
        refresh_token="r", expires_at_seconds=int(time.time()) - 3600, token_type="Bearer")})
    storage.close()
    assert gc.credentials_available()


def test_refused_credentials_are_a_clear_error(monkeypatch, tmp_path):
    """A 401 from Globus Auth (faked at the HTTP edge; the SDK's own client flow is real)."""
    monkeypatch.setenv("GLOBUS_COMPUTE_USER_DIR", str(tmp_path))  # no cached token
    monkeypatch.setenv(gc.ENV_CLIENT_ID, "6f1f2d3e-0000-4000-8000-000000000009")
    monkeypatch.setenv(gc.ENV_CLIENT_SECRET, "wrong")
    gc.set_shared_client(None)
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        rsps.add("POST", "https://auth.globus.org/v2/oauth2/token", status=401,
                 json={"error": "invalid_client",
                       "errors": [{"code": "UNAUTHORIZED", "status": "401"}]})
        with pytest.raises(GlobusServiceError, match="credentials were refused") as err:
            gc.shared_client()
    assert "wrong" not in str(err.value)  # the secret is never echoed
    gc.set_shared_client(None)


def test_globus_site_config_is_validated():
    def fed(compute):
        return FederationConfig.from_dict({"name": "g", "sites": {"polaris": {
            "compute": compute}}})

    with pytest.raises(ConfigError, match="sites.polaris.compute.endpoint_id"):
        fed({"type": "globus"})
    with pytest.raises(ConfigError, match="resource_specification.ranks_per_node"):
        fed({"type": "globus", "endpoint_id": "6f1f2d3e-0000-4000-8000-000000000001",
             "resource_specification": {"num_nodes": 2}})
    ok = fed({"type": "globus", "endpoint_id": "6f1f2d3e-0000-4000-8000-000000000001",
              "resource_specification": {"num_nodes": 2, "ranks_per_node": 4}})
    assert ok.site("polaris").compute["amqp_port"] == 443


def _globus_federation(cloud, sites: dict[str, int]) -> FederationConfig:
    return FederationConfig.from_dict({"name": "glob", "sites": {
        name: {"clients": n, "compute": {"type": "globus", "endpoint_id": cloud.add_endpoint(
            workers=n)}} for name, n in sites.items()}})


def test_quickstart_over_globus_sites_matches_the_local_federation(cloud, run_quickstart):
    fed = _globus_federation(cloud, {"polaris": 1, "perlmutter": 2, "frontier": 1})
    status, run_dir, summary = run_quickstart({"num-server-rounds": 3}, federation=fed)
    assert status == "finished:completed", (run_dir / "log.txt").read_text()[-3000:]
    local = FederationConfig.from_dict({"name": "glob", "sites": {
        name: {"clients": n, "compute": {"engine": "thread-pool", "workers": n}}
        for name, n in {"polaris": 1, "perlmutter": 2, "frontier": 1}.items()}})
    status2, _, summary2 = run_quickstart({"num-server-rounds": 3}, federation=local)
    assert status2 == "finished:completed"
    # identical results for the same seed, up to the float32 summation order of the replies
    # (they arrive in a different order)
    assert _leaves(summary) == pytest.approx(_leaves(summary2), rel=1e-6, abs=1e-9)
    assert summary["final_first"] and summary["num_nodes"] == 4
    tasks = read_tasks(run_dir)
    assert len(tasks) == 3 * 2 * 4 and {t["outcome"] for t in tasks} == {"ok"}


def _leaves(obj, prefix=""):
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            out.update(_leaves(v, f"{prefix}{k}/"))
        return out
    if isinstance(obj, list):
        return _leaves(dict(enumerate(obj)), prefix)
    return {prefix: obj}


def test_offline_endpoint_nodes_are_node_unavailable(cloud, run_quickstart):
    fed = _globus_federation(cloud, {"up": 2, "down": 1})
    cloud.set_status(fed.site("down").compute["endpoint_id"], "offline")
    status, run_dir, summary = run_quickstart({"num-server-rounds": 1}, federation=fed)
    tasks = read_tasks(run_dir)
    down = [t for t in tasks if t["site"] == "down"]
    assert down and all(t["outcome"] == "error:NODE_UNAVAILABLE" for t in down)
    assert all(t["outcome"] == "ok" for t in tasks if t["site"] == "up")
    assert status == "finished:completed"


def test_site_worker_ships_by_reference_and_loads_in_a_clean_interpreter():
    ser = gc.result_serializer()
    payload = ser.serialize(run_task)
    assert len(payload) < 200
    code = ("import sys; from globus_compute_sdk.serialize import ComputeSerializer;"
            f"fn = ComputeSerializer().deserialize({payload!r});"
            "print(fn.__module__ + '.' + fn.__name__)")
    out = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "flwr_hpc.worker.run_task"
    assert ser.deserialize(ser.serialize({"a": [1, "b"]})) == {"a": [1, "b"]}


def test_sites_check_without_credentials_fails_fast_and_names_the_variables(tmp_path):
    env = {k: v for k, v in __import__("os").environ.items()
           if not k.startswith("GLOBUS_COMPUTE_CLIENT")}
    env.update(FLWR_HOME=str(tmp_path / "home"), GLOBUS_COMPUTE_USER_DIR=str(tmp_path / "gc"))
    exe = __import__("pathlib").Path(sys.executable).parent / "flwr-hpc"
    t0 = time.monotonic()
    out = subprocess.run([str(exe), "sites", "check", "federation=doe4"], env=env,
                         capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert time.monotonic() - t0 < 20
    assert out.returncode == 1
    assert "GLOBUS_COMPUTE_CLIENT_ID" in out.stderr and "GLOBUS_COMPUTE_CLIENT_SECRET" in out.stderr
    assert "Traceback" not in out.stderr + out.stdout


def test_sites_check_probes_each_site_through_the_fake_cloud(cloud, flwr_home, capsys):
    from flwr_hpc.control.sites import check_sites

    fed = FederationConfig.from_dict({"name": "glob", "sites": {
        "polaris": {"compute": {"type": "globus", "endpoint_id": cloud.add_endpoint()}},
        "frontier": {"payload": {"type": "inline"},
                     "compute": {"type": "globus", "endpoint_id": cloud.add_endpoint()}},
        "aurora": {"compute": {"type": "globus", "endpoint_id": cloud.add_endpoint()}}}})
    cloud.set_status(fed.site("aurora").compute["endpoint_id"], "offline")
    checks = {c.site: c for c in check_sites(fed, flwr_home, timeout_s=30)}
    for name in ("polaris", "frontier"):  # shared-filesystem and inline payloads
        assert checks[name].ok and checks[name].store == "ok", checks[name]
        assert 0 < checks[name].round_trip_s < 10
    assert not checks["aurora"].ok and "offline" in checks["aurora"].error


def _submitted_jobs(cloud) -> list[dict]:
    """The site-worker jobs every submit to the fake service carried."""
    from flwr_hpc.protocol import task_serializer

    serde = task_serializer()
    jobs = []
    for submit in cloud.submits:
        for bufs in submit["body"]["tasks"].values():
            for buf in bufs:
                args_buf = serde.unpack_buffers(buf)[0]  # (args, kwargs)
                jobs.append(serde.deserialize(args_buf)[0])
    return jobs


def _inline_federation(cloud, sites: dict[str, int], **payload) -> FederationConfig:
    return FederationConfig.from_dict({"name": "glob", "sites": {
        name: {"clients": n, "payload": {"type": "inline", **payload},
               "compute": {"type": "globus", "endpoint_id": cloud.add_endpoint(workers=n)}}
        for name, n in sites.items()}})


def test_inline_payload_runs_the_quickstart_with_no_shared_storage(cloud, run_quickstart,
                                                                   flwr_home):
    fed = _inline_federation(cloud, {"polaris": 1, "perlmutter": 2})
    status, run_dir, summary = run_quickstart({"num-server-rounds": 2}, federation=fed)
    assert status == "finished:completed", (run_dir / "log.txt").read_text()[-3000:]
    tasks = read_tasks(run_dir)
    assert len(tasks) == 2 * 2 * 3 and {t["outcome"] for t in tasks} == {"ok"}
    assert summary["num_nodes"] == 3
    # nothing was written to a site store: every byte went through the task and its result
    assert not list((flwr_home / "hpc" / "sites").glob("*/*/store/objects/*"))
    assert all(t["bytes_from_site"] > 0 for t in tasks)
    sizes = [s["bytes"] for s in cloud.submits]
    assert max(sizes) < 8_000_000


def test_inline_task_over_the_limit_is_refused_before_submission(cloud, run_quickstart):
    fed = _inline_federation(cloud, {"polaris": 1, "perlmutter": 1}, max_task_bytes=200_000)
    status, run_dir, summary = run_quickstart({"num-server-rounds": 1, "model-size-mb": 0.5},
                                              federation=fed)
    tasks = read_tasks(run_dir)
    assert tasks and all(t["outcome"] == "error:NODE_UNAVAILABLE" for t in tasks)
    assert "over the inline store's limit" in tasks[0]["error"]
    assert "payload.type: shared-fs or globus-transfer" in tasks[0]["error"]
    # nothing but the FAB warm-up reached the service; no Executor was poisoned
    assert _submitted_jobs(cloud) and all(job.get("warmup") and "message_id" not in job
                                          for job in _submitted_jobs(cloud))
