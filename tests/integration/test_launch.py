"""Launcher rank mapping and launch failures (the 2-rank runs are in test_lora_job)."""

from __future__ import annotations

import sys
import time

import pytest
from flwr.common.constant import ErrorCode

from flwr_hpc import dist
from flwr_hpc.config import FederationConfig
from flwr_hpc.errors import ConfigError
from flwr_hpc.worker.launch import LaunchError, launch_command, launch_prefix, run_launched


@pytest.mark.parametrize("env, launcher, rank, size, local", [
    ({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_PORT": "555"},
     "torchrun", 1, 4, 1),
    ({"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "8",
      "OMPI_COMM_WORLD_LOCAL_RANK": "3"}, "openmpi", 3, 8, 3),
    ({"PMI_RANK": "2", "PMI_SIZE": "4", "PMI_LOCAL_RANK": "0"}, "mpich/pals", 2, 4, 0),
    ({"SLURM_PROCID": "5", "SLURM_NTASKS": "6", "SLURM_LOCALID": "1"}, "slurm", 5, 6, 1),
])
def test_launcher_rank_variables_map_to_torch_distributed(env, launcher, rank, size, local):
    env = {**env, dist.ENV_MASTER_PORT: "29999"}
    mapped = dist.rank_env(env)
    assert (mapped["RANK"], mapped["WORLD_SIZE"], mapped["LOCAL_RANK"]) == (
        str(rank), str(size), str(local))
    assert mapped["MASTER_PORT"] == env.get("MASTER_PORT", "29999")
    me = dist.info(env)
    assert (me.rank, me.world_size, me.launcher, me.is_primary) == (
        rank, size, launcher, rank == 0)


def test_single_process_is_rank_zero_of_one():
    me = dist.info({})
    assert (me.rank, me.world_size, me.enabled) == (0, 1, False)


def test_launch_commands(monkeypatch, tmp_path):
    job = tmp_path / "job.json"
    cmd = launch_command({"type": "torchrun", "ranks": 2}, job)
    assert cmd[:4] == [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    assert "--nproc-per-node=2" in cmd and cmd[-3:] == ["-m", "flwr_hpc.worker.launch", str(job)]
    custom = {"type": "mpiexec", "ranks": 8, "command": "mpiexec -n {ranks} --ppn 4"}
    assert launch_prefix(custom) == ["mpiexec", "-n", "8", "--ppn", "4"]
    monkeypatch.setenv("PARSL_MPI_PREFIX", "mpiexec -n 4 --hosts x1")
    assert launch_prefix({"type": "parsl", "ranks": 4}) == ["mpiexec", "-n", "4", "--hosts", "x1"]
    monkeypatch.delenv("PARSL_MPI_PREFIX")
    with pytest.raises(LaunchError, match="PARSL_MPI_PREFIX"):
        launch_prefix({"type": "parsl", "ranks": 4})


@pytest.mark.parametrize("persistent", [True, False])
def test_missing_launcher_is_a_crashed_client_app_reply(tmp_path, monkeypatch, persistent):
    monkeypatch.setenv("PATH", str(tmp_path))  # no srun here
    job = {"message_id": "ab" * 32, "apps_dir": str(tmp_path / "apps"),
           "launcher": {"type": "srun", "ranks": 2, "persistent": persistent}}
    result = run_launched(job, time.time())
    assert result["ok"] is False
    assert result["error_code"] == ErrorCode.CLIENT_APP_CRASHED
    assert "'srun' is not on PATH" in result["reason"]
    # nothing left behind: no launch or group directory, no file in one
    assert [p for p in (tmp_path / "launch").rglob("*") if p.is_file()] == []
    assert not list((tmp_path / "launch").glob("*/*"))


def test_launcher_config_is_validated():
    site = {"clients": 1, "launcher": {"type": "torchrun", "ranks": 2, "args": "--x"}}
    with pytest.raises(ConfigError, match="sites.a.launcher.args"):
        FederationConfig.from_dict({"name": "t", "sites": {"a": site}})
    site["launcher"]["args"] = ["--oversubscribe"]
    fed = FederationConfig.from_dict({"name": "t", "sites": {"a": site}})
    assert fed.site("a").launcher["args"] == ["--oversubscribe"]
