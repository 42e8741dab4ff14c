"""Site wiring: what the grid holds for each site of a federation.

:func:`build_sites` gives every site its compute backend (``compute/``), its payload store
(``payload/``, from the site's ``payload`` config: :func:`open_site_store`), its apps
directory and the fields every job to it carries (launcher, CPU thread share).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flwr_hpc._proc import usable_cpus
from flwr_hpc.compute import ComputeBackend, make_backend
from flwr_hpc.config import FederationConfig
from flwr_hpc.payload.inline import InlineStore
from flwr_hpc.payload.store import FilesystemStore, PayloadStore


@dataclass
class SiteRuntime:
    """What the grid holds for one site: its backend, its store, its apps dir."""

    backend: ComputeBackend
    store: PayloadStore
    apps_dir: Path
    job_extras: dict[str, Any] = field(default_factory=dict)  # launcher, thread share
    nodes: int = 1  # compute nodes per job (node-hour accounting)


def local_thread_share(federation: FederationConfig) -> int:
    """CPU threads per rank when all local sites' workers share the cores this process
    may use (:func:`~flwr_hpc._proc.usable_cpus`), at most ``OMP_NUM_THREADS`` when the
    user set it.
    """
    if federation.is_simulated():  # one shared pool runs every simulated site's tasks
        ranks = federation.sites[0].compute["workers"]
    else:
        ranks = sum(s.compute["workers"] * s.launcher["ranks"] for s in federation.sites
                    if s.compute["type"] == "local")
    share = max(1, usable_cpus() // max(ranks, 1))
    cap = os.environ.get("OMP_NUM_THREADS", "")
    return min(share, int(cap)) if cap.isdigit() and int(cap) > 0 else share


def site_root(federation: FederationConfig, site: str, flwr_home: Path) -> Path:
    """The site's working directory on this side (its store and apps, unless configured)."""
    base = Path(federation.workdir) if federation.workdir else flwr_home / "hpc" / "sites"
    if not federation.workdir:
        base = base / federation.name
    return base / site


def open_site_store(federation: FederationConfig, site: str, flwr_home: Path) -> PayloadStore:
    """The server's handle on ``site``'s payload store, from the site's ``payload`` config."""
    payload = federation.site(site).payload
    transfer = None
    if payload["collection_id"]:  # globus-transfer, or an inline site's file replies
        from flwr_hpc.payload.transfer import GlobusTransferStore, TransferSettings

        transfer = GlobusTransferStore(
            site, collection_id=payload["collection_id"],
            collection_path=payload["collection_path"], site_path=payload["path"],
            settings=TransferSettings.from_config(federation.transfer))
    if payload["type"] == "inline":
        reply_store = transfer or (FilesystemStore(payload["path"], site=site,
                                                   fsync=payload["fsync"])
                                   if payload["path"] else None)
        return InlineStore(site, max_task_bytes=payload["max_task_bytes"],
                           max_result_bytes=payload["max_result_bytes"],
                           reply_path=payload["path"], reply_store=reply_store)
    if transfer is not None:
        return transfer
    root = site_root(federation, site, flwr_home)
    return FilesystemStore(Path(payload["path"]) if payload.get("path") else root / "store",
                           site=site, fsync=payload["fsync"])


def build_sites(federation: FederationConfig, *, run_dir: Path, flwr_home: Path,
                backends: dict[str, ComputeBackend] | None = None,
                preload: tuple[str, ...] = ()) -> dict[str, SiteRuntime]:
    """Backend (unless given), store and apps dir of every site; on failure every backend
    built or given is closed before the error propagates.
    """
    sites: dict[str, SiteRuntime] = {}
    threads = local_thread_share(federation)
    try:
        for s in federation.sites:
            root = site_root(federation, s.name, flwr_home)
            store = open_site_store(federation, s.name, flwr_home)
            backend = (backends[s.name] if backends is not None
                       else make_backend(s, run_dir / "sites" / s.name, preload))
            extras: dict[str, Any] = {"launcher": dict(s.launcher)}
            if s.compute["type"] in ("local", "sim"):
                extras["threads"] = threads
            sites[s.name] = SiteRuntime(backend=backend, store=store, apps_dir=root / "apps",
                                        job_extras=extras, nodes=s.nodes_per_job())
    except BaseException:
        for rt in sites.values():
            rt.backend.close()
        for backend in (backends or {}).values():
            backend.close()
        raise
    return sites
