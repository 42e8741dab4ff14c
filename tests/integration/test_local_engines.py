"""The local compute backend runs tasks through real Globus Compute endpoint engines."""

from __future__ import annotations

import pytest

from flwr_hpc.compute.local import LocalEngineBackend
from flwr_hpc.errors import RemoteTaskError
from flwr_hpc.worker import JOB_VERSION, run_task


@pytest.mark.parametrize("engine", ["thread-pool", "process-pool", "htex"])
def test_engine_round_trip_and_json_results(engine, tmp_path):
    backend = LocalEngineBackend("s1", engine=engine, workers=1, run_dir=tmp_path / engine)
    try:
        # a job from a newer flwr-hpc is refused by the worker with a clear reason
        res = backend.submit(run_task, {"v": JOB_VERSION + 1, "message_id": "m"}).result(120)
        assert res["ok"] is False
        assert res["error_code"] == 0
        assert f"expects v{JOB_VERSION}" in res["reason"]
        # a worker function that raises reaches the server as RemoteTaskError with its text
        fut = backend.submit(run_task, {"v": JOB_VERSION, "message_id": "0" * 64})
        with pytest.raises(RemoteTaskError) as info:
            fut.result(120)
        assert "KeyError" in info.value.remote_traceback
    finally:
        backend.close()


def test_site_worker_serializes_by_reference():
    from globus_compute_sdk.serialize import ComputeSerializer

    payload = ComputeSerializer().serialize(run_task)
    assert len(payload) < 200  # an import reference, not the function's code
    assert "flwr_hpc.worker" in ComputeSerializer().deserialize(payload).__module__
