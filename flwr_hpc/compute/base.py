"""Compute plane: one backend per site runs site-worker tasks and returns small JSON results."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from globus_compute_sdk.serialize import JSONData


def decode_result(data: str) -> Any:
    """Decode a task result that must be JSON; anything else (dill, pickle) is refused."""
    strategy = JSONData()
    if not isinstance(data, str) or not data.startswith(strategy.identifier):
        head = repr(data[:8]) if isinstance(data, str) else type(data).__name__
        raise ValueError(f"task result is not JSON-serialized (header {head}); refusing to "
                         "deserialize it")
    return strategy.deserialize(data)


class ComputeBackend(ABC):
    """Runs ``fn(job)`` at one site.

    ``submit`` returns a future that resolves to the JSON-decoded return value of ``fn``,
    or fails with :class:`~flwr_hpc.errors.RemoteTaskError` (``fn`` raised at the site) or
    :class:`~flwr_hpc.errors.WorkerLostError` (the process running it died).
    """

    site: str

    @abstractmethod
    def submit(self, fn: Callable[[dict], dict], job: dict[str, Any]) -> Future:
        """Submit one task; never blocks on its execution."""

    def status(self) -> str:
        """``online``, ``offline`` or ``unknown``."""
        return "online"

    @abstractmethod
    def close(self) -> None:
        """Stop accepting tasks and make sure nothing of this backend keeps running."""
