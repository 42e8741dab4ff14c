"""Compute backends, one per site, chosen by the site's ``compute.type``."""

from __future__ import annotations

from pathlib import Path

from flwr_hpc.compute.base import ComputeBackend
from flwr_hpc.config import SiteConfig


def make_backend(site: SiteConfig, run_dir: Path, preload: tuple[str, ...] = ()
                 ) -> ComputeBackend:
    """The backend for ``site``'s ``compute.type``: a local engine for ``local`` and
    ``sim`` (a simulated site's real work runs here too), a Globus Compute executor for
    ``globus``; ``run_dir`` is the local engine's working directory, ``preload`` the
    libraries its workers' forkserver imports once (:func:`flwr_hpc.compute.local.worker_context`).
    """
    kind = site.compute["type"]
    if kind in ("local", "sim"):  # sim: the real work of a simulated site runs here too
        from flwr_hpc.compute.local import LocalEngineBackend

        return LocalEngineBackend(
            site.name,
            engine=site.compute["engine"],
            workers=site.compute["workers"],
            run_dir=run_dir,
            preload=preload,
        )
    if kind == "globus":
        from flwr_hpc.compute.globus import GlobusComputeBackend

        return GlobusComputeBackend(
            site.name, site.compute["endpoint_id"],
            resource_specification=site.compute["resource_specification"],
            user_endpoint_config=site.compute["user_endpoint_config"],
            amqp_port=site.compute["amqp_port"],
        )
    raise ValueError(f"site '{site.name}': unsupported compute type {kind!r}")


__all__ = ["ComputeBackend", "make_backend"]
