"""Local backend: a real Globus Compute endpoint engine, run in-process.

Tasks are packed exactly as the Globus Compute service delivers them to an endpoint
(``ComputeSerializer.pack_buffers`` of function, args and kwargs inside a messagepack
``Task``) and executed by the engine's own ``execute_task``, so the embedded default
exercises the serialization, allow-listing and 10 MiB result limit of a real endpoint.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import sys
import tempfile
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import psutil
from globus_compute_common import messagepack
from globus_compute_common.messagepack.message_types import Result, Task
from globus_compute_sdk.serialize import DillCode, JSONData
from typing_extensions import override

from flwr_hpc.compute.base import ComputeBackend, decode_result, task_failure
from flwr_hpc.errors import FlwrHpcError, WorkerLostError
from flwr_hpc.protocol import RESULT_SERIALIZERS, task_serializer

log = logging.getLogger(__name__)

# what every local site worker imports before it runs a task, whatever the app: the
# endpoint engine's task runner and the site worker (which imports Flower). A spawned worker
# spends about 1.4 s of CPU importing them; forked from a forkserver that did, none.
WORKER_IMPORTS = ("flwr_hpc.worker", "flwr.clientapp.utils",
                  "globus_compute_endpoint.engines.helper")


def worker_context(preload: tuple[str, ...] = ()) -> multiprocessing.context.BaseContext:
    """How local site workers are started: ``spawn`` (never ``fork``: the server process
    is multi-threaded), or -- unless ``FLWR_HPC_FORKSERVER`` is ``0`` -- a ``forkserver``
    that imported :data:`WORKER_IMPORTS` and ``preload`` (the heavy libraries the app
    imports, :func:`flwr_hpc.fab.heavy_imports`) once, so each worker starts in
    milliseconds instead of re-importing Flower, torch and transformers (seconds each).
    The forkserver is one per process and single-threaded (forking from it is safe); it
    keeps its first preload list and ends with the process that started it.
    """
    if os.environ.get("FLWR_HPC_FORKSERVER", "1") == "0":
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(sorted(set(preload) | set(WORKER_IMPORTS)))
    try:  # start it now (imports included) and prove it forks; else spawn, as before
        probe = ctx.Process(target=_noop, name="flwr-hpc-forkserver-probe")
        probe.start()
        probe.join(timeout=300)
        if probe.exitcode != 0:
            raise RuntimeError(f"probe exit code {probe.exitcode}")
    except Exception as err:  # noqa: BLE001 - any failure: fall back to spawn
        log.warning("site workers start with spawn: the forkserver failed (%s)", err)
        return multiprocessing.get_context("spawn")
    return ctx


def _noop() -> None:
    """The forkserver probe's target."""


def _init_worker(parent_pid: int, env: dict[str, str]) -> None:
    """A local site worker's initializer: the environment its runner has *now* (a
    forkserver's children would otherwise inherit the forkserver's, frozen when it
    started), and exit with the runner (:func:`flwr_hpc._proc.die_with_parent`).
    """
    from flwr_hpc._proc import die_with_parent

    os.environ.clear()
    os.environ.update(env)
    die_with_parent(parent_pid)


def _make_engine(engine: str, workers: int, run_dir: Path, preload: tuple[str, ...] = ()):
    allowed = [DillCode, JSONData]
    if engine == "process-pool":
        from globus_compute_endpoint.engines import ProcessPoolEngine

        # Workers die with the runner, so a killed runner leaves nothing running.
        return ProcessPoolEngine(
            max_workers=workers,
            mp_context=worker_context(preload),
            initializer=_init_worker,
            initargs=(os.getpid(), dict(os.environ)),
            allowed_serializers=allowed,
        )
    if engine == "thread-pool":
        from globus_compute_endpoint.engines import ThreadPoolEngine

        return ThreadPoolEngine(max_workers=workers, allowed_serializers=allowed)
    if engine == "htex":
        from globus_compute_endpoint.engines import GlobusComputeEngine
        from parsl.providers import LocalProvider

        # The interchange is started as `globus-compute-endpoint python-exec ...`.
        bindir = str(Path(sys.executable).parent)
        if bindir not in os.environ.get("PATH", "").split(os.pathsep):
            os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")
        return GlobusComputeEngine(
            provider=LocalProvider(init_blocks=1, min_blocks=1, max_blocks=1),
            max_workers_per_node=workers,
            address="127.0.0.1",
            encrypted=False,
            allowed_serializers=allowed,
        )
    raise ValueError(f"unknown local engine {engine!r}")


def _stop_processes(pids: list[int], grace_s: float = 5.0) -> None:
    """Terminate ``pids`` and their descendants; kill whatever is left after ``grace_s``."""
    victims: list[psutil.Process] = []
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            victims.extend(proc.children(recursive=True))
            victims.append(proc)
        except psutil.NoSuchProcess:
            pass
    for proc in victims:
        try:
            proc.terminate()
        except psutil.NoSuchProcess:
            pass
    _gone, alive = psutil.wait_procs(victims, timeout=grace_s)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass


class LocalEngineBackend(ComputeBackend):
    """One site backed by a Globus Compute engine on this machine."""

    def __init__(self, site: str, engine: str = "process-pool", workers: int = 1,
                 run_dir: str | Path | None = None, preload: tuple[str, ...] = ()) -> None:
        super().__init__(site)
        self.engine_name = engine
        self.workers = workers
        self.preload = tuple(preload)
        self._own_run_dir = run_dir is None
        self.run_dir = Path(run_dir or tempfile.mkdtemp(prefix=f"flwr-hpc-{site}-"))
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._serde = task_serializer()
        self._code: dict[Callable[[dict], dict], str] = {}
        self._restart_lock = threading.Lock()
        self._engine = _make_engine(engine, workers, self.run_dir, self.preload)
        self._engine.start(endpoint_id=uuid.uuid4(), run_dir=str(self.run_dir))
        self._closed = False

    @override
    def start(self, fn: Callable[[dict], dict], job: dict[str, Any]) -> Future:
        from globus_compute_endpoint.engines import GCFuture

        if self._closed:
            raise RuntimeError(f"backend for site '{self.site}' is closed")
        self._restart_if_broken()
        task_id = uuid.uuid4()
        code = self._code.get(fn)
        if code is None:  # the same few functions every task: serialized once
            code = self._code[fn] = self._serde.serialize(fn)
        buf = self._serde.pack_buffers(
            [code, self._serde.serialize((job,)), self._serde.serialize({})]
        )
        packed = messagepack.pack(Task(task_id=task_id, task_buffer=buf))
        engine_future = GCFuture(task_id)
        self._engine.submit(
            engine_future, packed, resource_specification={},
            result_serializers=RESULT_SERIALIZERS,
        )
        return engine_future

    def decode(self, raw: Any) -> dict:
        """The engine's messagepack ``Result``: an error (lost worker or a raise) or JSON."""
        res = messagepack.unpack(raw)
        assert isinstance(res, Result)
        if res.is_error:
            raise task_failure(self.site, str(res.data))
        return decode_result(res.data)

    def failure(self, exc: BaseException) -> FlwrHpcError:
        """The engine's future itself failed: its worker process is gone."""
        return WorkerLostError(self.site, f"{type(exc).__name__}: {exc}")

    def _restart_if_broken(self) -> None:
        # A process pool whose worker died is unusable for good: replace it, as an endpoint
        # would replace a lost worker, so the site keeps serving later rounds.
        with self._restart_lock:  # two submits seeing the broken pool restart it once
            executor = getattr(self._engine, "executor", None)
            if not getattr(executor, "_broken", False):
                return
            log.warning("site '%s': a worker process died; restarting the engine", self.site)
            # The broken pool terminates the workers it knows; one it started while the
            # first died may not be among them and would wait for tasks for ever.
            _stop_processes(self._worker_pids())
            try:
                self._engine.shutdown(block=False)
            except Exception:  # noqa: BLE001
                pass
            self._engine = _make_engine(self.engine_name, self.workers, self.run_dir,
                                        self.preload)
            self._engine.start(endpoint_id=uuid.uuid4(), run_dir=str(self.run_dir))

    def _worker_pids(self) -> list[int]:
        """The live workers of the current engine. Asked of the
        ``multiprocessing`` process objects, so a pid the system gave to another process
        since its worker exited is never returned (HTEX: none; its processes are this
        process's descendants started for the engine and end with it).
        """
        executor = getattr(self._engine, "executor", None)
        procs = getattr(executor, "_processes", None) or {}
        return [int(pid) for pid, proc in list(procs.items()) if proc.exitcode is None]

    @override
    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        # Tasks cannot be cancelled remotely; locally we make sure nothing survives
        # (workers of pools replaced after a worker died were stopped then).
        _stop_processes(self._worker_pids())
        try:
            self._engine.shutdown(block=False)
        except Exception as err:  # noqa: BLE001
            log.debug("engine shutdown for %s: %s", self.site, err)
        self.fail_pending("backend closed")
        if self._own_run_dir:
            shutil.rmtree(self.run_dir, ignore_errors=True)
