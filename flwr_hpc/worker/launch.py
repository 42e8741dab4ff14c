"""Launch the ClientApp as a data-parallel rank group with the site's launcher.

The site worker (:func:`flwr_hpc.worker.run_task`) writes the job to a launch directory
and starts ``python -m flwr_hpc.worker.launch <job.json>`` on ``ranks`` processes with the site's
launcher. Every rank fetches the same message and runs the ClientApp; the ClientApp joins
the group through :func:`flwr_hpc.dist.init` (gloo on CPU, nccl on GPU). Rank 0 alone
writes the reply to the store and ``result.json`` to the launch directory, which the
worker returns as the task's result. A launch that ends without ``result.json`` (a rank
crashed, the launcher failed) is reported as a crashed ClientApp with the launch log's
tail, so the failure is visible in the server's Error reply.

Launcher commands (``launcher.args`` are inserted before the Python command):

============  ==========================================================================
``torchrun``  ``python -m torch.distributed.run --standalone --nproc-per-node N``
``mpirun``    ``mpirun -np N`` (Open MPI; as root the allow-run-as-root variables are set)
``mpiexec``   ``mpiexec -n N`` (MPICH / Cray PALS, e.g. Polaris and Aurora)
``srun``      ``srun -n N`` (Slurm, e.g. Perlmutter and Frontier)
``parsl``     ``$PARSL_MPI_PREFIX`` (set by Parsl's MPI mode inside a Globus Compute
              endpoint; it already holds the rank count)
============  ==========================================================================

``launcher.command`` replaces the whole prefix (``{ranks}`` is substituted), for sites
whose MPI launch line needs more, e.g. ``mpiexec -n {ranks} --ppn 4 --cpu-bind depth``.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from flwr.common.constant import ErrorCode

import flwr_hpc.dist as dist
from flwr_hpc.dist import ENV_MASTER_PORT
from flwr_hpc.worker.execute import execute, failure_result, limit_threads

LOG_TAIL_CHARS = 3000


class LaunchError(RuntimeError):
    """The site's launcher cannot be used (missing executable, unset prefix, ...)."""


def launch_prefix(launcher: dict[str, Any]) -> list[str]:
    """The command words that start ``launcher['ranks']`` copies of a Python command."""
    kind, ranks = launcher["type"], int(launcher["ranks"])
    args = list(launcher.get("args") or [])
    if launcher.get("command"):
        return shlex.split(str(launcher["command"]).format(ranks=ranks)) + args
    if kind == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc-per-node={ranks}", *args]
    if kind == "parsl":
        prefix = os.environ.get("PARSL_MPI_PREFIX")
        if not prefix:
            raise LaunchError("launcher 'parsl' needs $PARSL_MPI_PREFIX (run the endpoint "
                              "with Parsl's MPI mode enabled)")
        return shlex.split(prefix) + args
    exe, flag = {"mpirun": ("mpirun", "-np"), "mpiexec": ("mpiexec", "-n"),
                 "srun": ("srun", "-n")}[kind]
    if shutil.which(exe) is None:
        raise LaunchError(f"launcher {kind!r}: '{exe}' is not on PATH at this site")
    return [exe, flag, str(ranks), *args]


def launch_command(launcher: dict[str, Any], job_file: Path) -> list[str]:
    """The whole command that runs this module's :func:`rank_main` on ``job_file`` as a
    rank group (torchrun without ``launcher.command`` starts Python itself).
    """
    python = [] if launcher["type"] == "torchrun" and not launcher.get("command") else [
        sys.executable]
    module = ["-m", "flwr_hpc.worker.launch", str(job_file)]
    return launch_prefix(launcher) + python + module


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch_env(launcher: dict[str, Any]) -> dict[str, str]:
    env = dict(os.environ)
    env.update({str(k): str(v) for k, v in (launcher.get("env") or {}).items()})
    env.setdefault(ENV_MASTER_PORT, str(_free_port()))
    if launcher["type"] == "mpirun" and os.geteuid() == 0:
        # Open MPI refuses to start as root unless told; containers often run as root.
        env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
        env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    return env


def run_launched(job: dict[str, Any], started_at: float) -> dict[str, Any]:
    """Run ``job`` on a rank group; return rank 0's result (or a crash report)."""
    launcher = job["launcher"]
    launch_dir = Path(job["apps_dir"]).parent / "launch" / uuid.uuid4().hex
    launch_dir.mkdir(parents=True)
    job_file = launch_dir / "job.json"
    job_file.write_text(json.dumps(job))
    log_file = launch_dir / "launch.log"
    try:
        cmd = launch_command(launcher, job_file)
        with open(log_file, "wb") as log:
            proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT,
                                  env=_launch_env(launcher), check=False)
        result_file = launch_dir / "result.json"
        if result_file.exists():
            result = json.loads(result_file.read_text())
            result["ranks"] = int(launcher["ranks"])
            result["launch_s"] = time.time() - started_at
            return result
        tail = log_file.read_text(errors="replace")[-LOG_TAIL_CHARS:]
        return failure_result(job, ErrorCode.CLIENT_APP_CRASHED,
                              f"{launcher['type']} launch of {launcher['ranks']} ranks exited "
                              f"{proc.returncode} without a reply; command: {shlex.join(cmd)}\n"
                              f"log tail:\n{tail}", started_at)
    except (LaunchError, OSError) as err:
        return failure_result(job, ErrorCode.CLIENT_APP_CRASHED, f"{type(err).__name__}: {err}",
                              started_at)
    finally:
        if not os.environ.get("FLWR_HPC_KEEP_LAUNCH_DIRS"):
            shutil.rmtree(launch_dir, ignore_errors=True)


def rank_main(job_file: Path) -> int:
    """One rank: run the job; rank 0 writes ``result.json`` next to the job file."""
    started_at = time.time()
    job = json.loads(job_file.read_text())
    limit_threads(job.get("threads"))
    me = dist.info()  # the ClientApp joins the group with dist.init()
    result = execute(job, started_at, primary=me.is_primary)
    if "torch" in sys.modules:
        import torch.distributed as tdist

        if tdist.is_available() and tdist.is_initialized():
            tdist.barrier()
            tdist.destroy_process_group()
    if me.is_primary:
        result["rank"] = me.rank
        result["world_size"] = me.world_size
        result["launcher"] = me.launcher
        tmp = job_file.with_name("result.json.tmp")
        tmp.write_text(json.dumps(result))
        os.replace(tmp, job_file.with_name("result.json"))
    return 0 if result.get("ok") else 1


if __name__ == "__main__":
    sys.exit(rank_main(Path(sys.argv[1])))
