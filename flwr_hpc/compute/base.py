"""Compute plane: one backend per site runs site-worker tasks and returns small JSON results.

:class:`ComputeBackend` holds the submission logic every backend shares, the way Globus
Compute's ``GlobusComputeEngineBase.submit`` does for its engines: the *outer* future the
grid waits on, one classifier that tells a lost worker from a task that raised
(:func:`task_failure`), JSON-only result decoding, and failing whatever is still pending
when the backend closes. A backend implements only what differs: :meth:`~ComputeBackend.start`
(hand one task to its engine or service and return that side's future) and, where its
results or failures arrive in another shape, :meth:`~ComputeBackend.decode` and
:meth:`~ComputeBackend.failure`.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from globus_compute_sdk.serialize import JSONData

from flwr_hpc.errors import FlwrHpcError, RemoteTaskError, WorkerLostError

#: Text that marks a task whose worker (or the manager above it) died, in the error text of
#: a local engine (``BrokenProcessPool``, "terminated abruptly") or of the Globus Compute
#: SDK and service (``WorkerLost``, ``ManagerLost``, a dead result channel).
WORKER_LOST_MARKERS = ("BrokenProcessPool", "WorkerLost", "ManagerLost", "terminated abruptly",
                       "SDK thread quit unexpectedly", "Unable to sustain channel")


def decode_result(data: str) -> Any:
    """Decode a task result that must be JSON; anything else (dill, pickle) is refused."""
    strategy = JSONData()
    if not isinstance(data, str) or not data.startswith(strategy.identifier):
        head = repr(data[:8]) if isinstance(data, str) else type(data).__name__
        raise ValueError(f"task result is not JSON-serialized (header {head}); refusing to "
                         "deserialize it")
    return strategy.deserialize(data)


def task_failure(site: str, text: str) -> FlwrHpcError:
    """The error for a task that failed with ``text``: :class:`WorkerLostError` (naming the
    line that says so) when its worker was lost, else :class:`RemoteTaskError`.
    """
    lost = [ln.strip() for ln in text.splitlines() if any(m in ln for m in WORKER_LOST_MARKERS)]
    if lost:
        return WorkerLostError(site, lost[-1])
    return RemoteTaskError(site, text)


class ComputeBackend(ABC):
    """Runs ``fn(job)`` at one site.

    ``submit`` returns a future that resolves to the JSON-decoded return value of ``fn``,
    or fails with :class:`~flwr_hpc.errors.RemoteTaskError` (``fn`` raised at the site) or
    :class:`~flwr_hpc.errors.WorkerLostError` (the process running it died).
    """

    def __init__(self, site: str) -> None:
        self.site = site
        self._pending: set[Future] = set()  # outer futures not settled yet
        self._pending_lock = threading.Lock()

    def submit(self, fn: Callable[[dict], dict], job: dict[str, Any]) -> Future:
        """Submit one task; never blocks on its execution."""
        inner = self.start(fn, job)
        outer: Future = Future()
        outer.set_running_or_notify_cancel()
        with self._pending_lock:
            self._pending.add(outer)

        def settle(f: Future) -> None:
            with self._pending_lock:
                self._pending.discard(outer)
            if outer.done():
                return
            try:
                exc = f.exception()
            except BaseException as err:  # noqa: BLE001 - a cancelled future
                exc = err
            try:
                if exc is not None:
                    outer.set_exception(self.failure(exc))
                else:
                    outer.set_result(self.decode(f.result()))
            except FlwrHpcError as err:
                if not outer.done():
                    outer.set_exception(err)
            except Exception as err:  # noqa: BLE001 - any decoding failure is this task's
                if not outer.done():
                    outer.set_exception(RemoteTaskError(self.site,
                                                        f"{type(err).__name__}: {err}"))

        inner.add_done_callback(settle)
        return outer

    @abstractmethod
    def start(self, fn: Callable[[dict], dict], job: dict[str, Any]) -> Future:
        """Hand one task to the engine or service; return its future (any shape that
        :meth:`decode` and :meth:`failure` understand).
        """

    def decode(self, raw: Any) -> dict:
        """The task's JSON result from what the inner future returned."""
        return raw if isinstance(raw, dict) else decode_result(raw)

    def failure(self, exc: BaseException) -> FlwrHpcError:
        """The error the grid sees for an inner future that failed with ``exc``."""
        if isinstance(exc, FlwrHpcError):
            return exc
        return task_failure(self.site, f"{type(exc).__name__}: {exc}")

    def fail_pending(self, reason: str) -> None:
        """Fail every task still pending (the backend is closing: nothing will answer)."""
        with self._pending_lock:
            pending = list(self._pending)
            self._pending.clear()
        for fut in pending:
            if not fut.done():
                fut.set_exception(WorkerLostError(self.site, reason))

    def status(self) -> str:
        """``online``, ``offline`` or ``unknown``."""
        return "online"

    @abstractmethod
    def close(self) -> None:
        """Stop accepting tasks and make sure nothing of this backend keeps running."""
