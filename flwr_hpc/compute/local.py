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

from flwr_hpc.compute.base import ComputeBackend, decode_result
from flwr_hpc.errors import RemoteTaskError, WorkerLostError
from flwr_hpc.protocol import RESULT_SERIALIZERS, task_serializer

log = logging.getLogger(__name__)

_WORKER_LOST_MARKERS = ("BrokenProcessPool", "WorkerLost", "ManagerLost", "terminated abruptly")


def _make_engine(engine: str, workers: int, run_dir: Path):
    allowed = [DillCode, JSONData]
    if engine == "process-pool":
        from globus_compute_endpoint.engines import ProcessPoolEngine

        from flwr_hpc._proc import die_with_parent

        # spawn, not fork: the server process is multi-threaded. Workers die with the
        # runner, so a killed runner leaves nothing running.
        return ProcessPoolEngine(
            max_workers=workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=die_with_parent,
            initargs=(os.getpid(),),
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


class LocalEngineBackend(ComputeBackend):
    """One site backed by a Globus Compute engine on this machine."""

    def __init__(self, site: str, engine: str = "process-pool", workers: int = 1,
                 run_dir: str | Path | None = None) -> None:
        self.site = site
        self.engine_name = engine
        self.workers = workers
        self._own_run_dir = run_dir is None
        self.run_dir = Path(run_dir or tempfile.mkdtemp(prefix=f"flwr-hpc-{site}-"))
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._serde = task_serializer()
        self._engine = _make_engine(engine, workers, self.run_dir)
        self._engine.start(endpoint_id=uuid.uuid4(), run_dir=str(self.run_dir))
        self._closed = False
        self._lock = threading.Lock()
        self._futures: set[Future] = set()

    def submit(self, fn: Callable[[dict], dict], job: dict[str, Any]) -> Future:
        from globus_compute_endpoint.engines import GCFuture

        if self._closed:
            raise RuntimeError(f"backend for site '{self.site}' is closed")
        self._restart_if_broken()
        task_id = uuid.uuid4()
        buf = self._serde.pack_buffers(
            [self._serde.serialize(fn), self._serde.serialize((job,)), self._serde.serialize({})]
        )
        packed = messagepack.pack(Task(task_id=task_id, task_buffer=buf))
        engine_future = GCFuture(task_id)
        outer: Future = Future()
        outer.set_running_or_notify_cancel()
        with self._lock:
            self._futures.add(outer)

        def _done(f: Future) -> None:
            with self._lock:
                self._futures.discard(outer)
            if outer.done():
                return
            try:
                exc = f.exception()
                if exc is not None:
                    outer.set_exception(WorkerLostError(self.site, f"{type(exc).__name__}: {exc}"))
                    return
                res = messagepack.unpack(f.result())
                assert isinstance(res, Result)
                if res.is_error:
                    text = str(res.data)
                    if any(m in text for m in _WORKER_LOST_MARKERS):
                        lines = [ln for ln in text.splitlines()
                                 if any(m in ln for m in _WORKER_LOST_MARKERS)]
                        outer.set_exception(WorkerLostError(self.site, lines[-1].strip()))
                    else:
                        outer.set_exception(RemoteTaskError(self.site, text))
                    return
                outer.set_result(decode_result(res.data))
            except Exception as err:  # noqa: BLE001 - any decoding failure is this task's error
                if not outer.done():
                    outer.set_exception(RemoteTaskError(self.site, f"{type(err).__name__}: {err}"))

        engine_future.add_done_callback(_done)
        self._engine.submit(
            engine_future, packed, resource_specification={},
            result_serializers=RESULT_SERIALIZERS,
        )
        return outer

    def _restart_if_broken(self) -> None:
        # A process pool whose worker died is unusable for good: replace it, as an endpoint
        # would replace a lost worker, so the site keeps serving later rounds.
        executor = getattr(self._engine, "executor", None)
        if getattr(executor, "_broken", False):
            log.warning("site '%s': a worker process died; restarting the engine", self.site)
            try:
                self._engine.shutdown(block=False)
            except Exception:  # noqa: BLE001
                pass
            self._engine = _make_engine(self.engine_name, self.workers, self.run_dir)
            self._engine.start(endpoint_id=uuid.uuid4(), run_dir=str(self.run_dir))

    def _worker_pids(self) -> list[int]:
        pids: list[int] = []
        executor = getattr(self._engine, "executor", None)
        procs = getattr(executor, "_processes", None) or {}
        pids.extend(int(p) for p in procs)
        # HTEX: everything is a descendant of this process started for the engine.
        return pids

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        pids = self._worker_pids()
        victims: list[psutil.Process] = []
        for pid in pids:
            try:
                proc = psutil.Process(pid)
                victims.extend(proc.children(recursive=True))
                victims.append(proc)
            except psutil.NoSuchProcess:
                pass
        # Tasks cannot be cancelled remotely; locally we make sure nothing survives.
        for proc in victims:
            try:
                proc.terminate()
            except psutil.NoSuchProcess:
                pass
        _gone, alive = psutil.wait_procs(victims, timeout=5)
        for proc in alive:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        try:
            self._engine.shutdown(block=False)
        except Exception as err:  # noqa: BLE001
            log.debug("engine shutdown for %s: %s", self.site, err)
        with self._lock:
            pending = list(self._futures)
            self._futures.clear()
        for fut in pending:
            if not fut.done():
                fut.set_exception(WorkerLostError(self.site, "backend closed"))
        if self._own_run_dir:
            shutil.rmtree(self.run_dir, ignore_errors=True)
