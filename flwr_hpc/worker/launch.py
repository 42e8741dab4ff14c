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

**Persistent rank groups** (``launcher.persistent``, the default). Relaunching the group
for every message re-imports torch on every rank, reloads the base model and re-forms
the process group each round (~17 s per task here for a model that loads in
milliseconds; minutes for a 7B model on a shared filesystem). So the first task a site
worker process runs for a FAB and launcher launches a :class:`RankGroup` in serve mode
(``python -m flwr_hpc.worker.launch --serve <group dir>``) and later tasks are fed to the
live group through its directory on the site's filesystem (nothing inbound from outside
the site): the worker writes ``task-<n>.json`` (atomically), every rank runs it (the
ranks keep the model, the tokenized shards and the process group in memory between
tasks), rank 0 marks ``claimed-<n>`` when it starts and writes ``result-<n>.json``. The
group ends when its worker tells it to (another FAB or launcher, the worker's exit),
after ``launcher.idle_s`` without a task, or when the worker process is gone (every
rank watches its pid, so a killed worker leaves no ranks behind). A group found dead is
relaunched transparently: a task it never claimed is retried once on the new group; a
task it died running gets a CLIENT_APP_CRASHED reply with the launch log's tail -- never
a hang. ``launcher.persistent: false`` launches a group per task as before.
"""

from __future__ import annotations

import atexit
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from flwr.common.constant import ErrorCode

import flwr_hpc.dist as dist
from flwr_hpc._proc import pid_alive
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


def launch_command(launcher: dict[str, Any], job_file: Path, *, serve: bool = False
                   ) -> list[str]:
    """The whole command that runs this module's :func:`rank_main` on ``job_file`` (or,
    ``serve``, :func:`serve_main` on the group directory ``job_file``) as a rank group
    (torchrun without ``launcher.command`` starts Python itself).
    """
    python = [] if launcher["type"] == "torchrun" and not launcher.get("command") else [
        sys.executable]
    module = ["-m", "flwr_hpc.worker.launch", *(["--serve"] if serve else []), str(job_file)]
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
    if job["launcher"].get("persistent", True):
        return run_on_group(job, started_at)
    return run_once(job, started_at)


def run_once(job: dict[str, Any], started_at: float) -> dict[str, Any]:
    """Launch a rank group for ``job`` alone (``launcher.persistent: false``)."""
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


# ----------------------------------------------------------------------------- groups

POLL_S = (0.002, 0.05)  # result polling: starts fast, backs off to this
_GROUPS: dict[str, RankGroup] = {}  # this worker process's live groups, by key


def _group_key(job: dict[str, Any]) -> str:
    return json.dumps({"fab": job.get("fab_hash"), "launcher": job["launcher"]},
                      sort_keys=True)


class RankGroup:
    """A rank group launched in serve mode, fed one task at a time (module docstring)."""

    def __init__(self, launcher: dict[str, Any], base: Path) -> None:
        self.launcher = launcher
        self.dir = base / "groups" / uuid.uuid4().hex
        self.cmd = launch_command(launcher, self.dir, serve=True)  # LaunchError: no dir left
        self.dir.mkdir(parents=True)
        self.seq = 0
        (self.dir / "group.json").write_text(json.dumps({
            "owner_pid": os.getpid(), "idle_s": float(launcher.get("idle_s", 600.0))}))
        self.log_file = self.dir / "launch.log"
        with open(self.log_file, "wb") as log:
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=_launch_env(launcher),
                                         start_new_session=True)

    def alive(self) -> bool:
        """Whether the launcher (and so the group) still runs."""
        return self.proc.poll() is None

    def submit(self, job: dict[str, Any]) -> tuple[dict[str, Any] | None, bool]:
        """Run ``job`` on the group: ``(result, claimed)``; ``result`` None when the group
        died first (``claimed``: whether rank 0 had started the task).
        """
        self.seq += 1
        n = self.seq
        tmp = self.dir / f".task-{n}.json"
        tmp.write_text(json.dumps(job))
        os.replace(tmp, self.dir / f"task-{n}.json")
        result_file, claimed = self.dir / f"result-{n}.json", self.dir / f"claimed-{n}"
        delay = POLL_S[0]
        while True:
            if result_file.exists():
                result = json.loads(result_file.read_text())
                for name in (f"task-{n}.json", f"result-{n}.json", f"claimed-{n}"):
                    (self.dir / name).unlink(missing_ok=True)
                return result, True
            if not self.alive():
                if result_file.exists():  # written just before the exit
                    continue
                return None, claimed.exists()
            time.sleep(delay)
            delay = min(delay * 1.5, POLL_S[1])

    def log_tail(self) -> str:
        """The end of the group's launch log (for a crash report)."""
        try:
            return self.log_file.read_text(errors="replace")[-LOG_TAIL_CHARS:]
        except OSError:
            return ""

    def stop(self, grace_s: float = 10.0) -> None:
        """Ask the ranks to end, then end the launcher's whole session."""
        if self.alive():
            (self.dir / "stop").touch()
            try:
                self.proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                pass
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            self.proc.wait()
        if not os.environ.get("FLWR_HPC_KEEP_LAUNCH_DIRS"):
            shutil.rmtree(self.dir, ignore_errors=True)


def stop_groups() -> None:
    """End every group this worker process launched (at exit, and on a new run)."""
    while _GROUPS:
        _, group = _GROUPS.popitem()
        group.stop()


atexit.register(stop_groups)


def run_on_group(job: dict[str, Any], started_at: float) -> dict[str, Any]:
    """Run ``job`` on this worker's live group for its FAB and launcher, launching one
    first if there is none (or it died); see the module docstring.
    """
    launcher = job["launcher"]
    key = _group_key(job)
    for other in [k for k in _GROUPS if k != key]:  # another run's or launcher's group
        _GROUPS.pop(other).stop()
    for attempt in (1, 2):
        group = _GROUPS.get(key)
        warm = group is not None and group.alive()
        if not warm:
            if group is not None:
                _GROUPS.pop(key).stop()
            try:
                group = _GROUPS[key] = RankGroup(launcher,
                                                 Path(job["apps_dir"]).parent / "launch")
            except (LaunchError, OSError) as err:
                return failure_result(job, ErrorCode.CLIENT_APP_CRASHED,
                                      f"{type(err).__name__}: {err}", started_at)
        assert group is not None
        result, claimed = group.submit(job)
        if result is not None:
            result["ranks"] = int(launcher["ranks"])
            result["launch_s"] = time.time() - started_at
            result["group_task"] = group.seq  # 1: this task launched the group
            return result
        tail, cmd, code = group.log_tail(), group.cmd, group.proc.returncode
        _GROUPS.pop(key).stop()
        if claimed or attempt == 2:
            return failure_result(
                job, ErrorCode.CLIENT_APP_CRASHED,
                f"{launcher['type']} rank group of {launcher['ranks']} ranks exited {code} "
                f"{'while running' if claimed else 'before starting'} this task; command: "
                f"{shlex.join(cmd)}\nlog tail:\n{tail}", started_at)
    raise AssertionError("unreachable")


def serve_main(group_dir: Path) -> int:
    """One rank of a persistent group: run ``task-<n>.json`` files in order until told
    to stop, idle for ``idle_s``, or the worker that launched the group is gone.
    """
    spec = json.loads((group_dir / "group.json").read_text())
    owner, idle_s = int(spec["owner_pid"]), float(spec["idle_s"])
    me = dist.info()
    n, last = 0, time.monotonic()
    delay = POLL_S[0]
    try:
        while True:
            task = group_dir / f"task-{n + 1}.json"
            if task.exists():
                n += 1
                started_at = time.time()
                if me.is_primary:
                    (group_dir / f"claimed-{n}").touch()
                job = json.loads(task.read_text())
                limit_threads(job.get("threads"))
                result = execute(job, started_at, primary=me.is_primary)
                _barrier()
                if me.is_primary:
                    _write_result(result, me, group_dir / f"result-{n}.json")
                last, delay = time.monotonic(), POLL_S[0]
                continue
            if ((group_dir / "stop").exists() or not pid_alive(owner)
                    or time.monotonic() - last > idle_s):
                return 0
            time.sleep(delay)
            delay = min(delay * 1.5, POLL_S[1])
    finally:
        _end_process_group()


def _write_result(result: dict[str, Any], me: dist.DistInfo, path: Path) -> None:
    """Rank 0's result, with its place in the group, written atomically to ``path``."""
    result.update(rank=me.rank, world_size=me.world_size, launcher=me.launcher)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(result))
    os.replace(tmp, path)


def _barrier() -> None:
    if "torch" in sys.modules:
        import torch.distributed as tdist

        if tdist.is_available() and tdist.is_initialized():
            tdist.barrier()


def _end_process_group() -> None:
    if "torch" in sys.modules:
        import torch.distributed as tdist

        if tdist.is_available() and tdist.is_initialized():
            tdist.destroy_process_group()


def rank_main(job_file: Path) -> int:
    """One rank: run the job; rank 0 writes ``result.json`` next to the job file."""
    started_at = time.time()
    job = json.loads(job_file.read_text())
    limit_threads(job.get("threads"))
    me = dist.info()  # the ClientApp joins the group with dist.init()
    result = execute(job, started_at, primary=me.is_primary)
    _barrier()
    _end_process_group()
    if me.is_primary:
        _write_result(result, me, job_file.with_name("result.json"))
    return 0 if result.get("ok") else 1


if __name__ == "__main__":
    if sys.argv[1] == "--serve":
        sys.exit(serve_main(Path(sys.argv[2])))
    sys.exit(rank_main(Path(sys.argv[1])))
