"""``flwr-hpc sites check``: whether every site of a federation is ready for a run.

For each site: the credentials its backend needs, the endpoint's status, the reachability
of its Globus collection (Transfer sites), and a round-trip probe -- a tiny task
(:func:`flwr_hpc.worker.probe`) that reads an object the server put in the site's store and
writes one back, so the compute path and the payload path are both exercised -- with its
latency; a Transfer site's probe crosses in a tiny transfer each way. Sites are checked in
parallel; an offline site or a failed probe fails the check with the reason, and nothing
waits longer than ``timeout_s``.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from flwr_hpc.config import FederationConfig
from flwr_hpc.errors import FlwrHpcError


@dataclass
class SiteCheck:
    """One site's row of the check: what was found, and ``error`` when it is not ready."""

    site: str
    compute: str
    status: str = "unknown"
    round_trip_s: float | None = None
    store: str = "-"
    host: str = "-"
    error: str = ""
    collection: str = "-"                   # Transfer sites: the collection's reachability
    transfer_to_s: float | None = None      # the probe's transfer to the site
    transfer_from_s: float | None = None    # and back

    @property
    def ok(self) -> bool:
        """Whether the site passed (no ``error``)."""
        return not self.error


def check_site(federation: FederationConfig, name: str, flwr_home: Path,
               timeout_s: float) -> SiteCheck:
    """Check one site: its endpoint's status, its collection (Transfer sites), and a
    probe task that reads an object from the site's store and writes one back, waited
    for ``timeout_s`` at most. Every failure is reported in the row, never raised.
    """
    from flwr_hpc.compute import make_backend
    from flwr_hpc.payload.objects import sha256_hex
    from flwr_hpc.payload.transfer import GlobusTransferStore
    from flwr_hpc.server.sites import open_site_store, site_root
    from flwr_hpc.worker import probe

    site = federation.site(name)
    result = SiteCheck(name, site.compute["type"])
    root = site_root(federation, name, flwr_home)
    backend = None
    try:
        store = open_site_store(federation, name, flwr_home)
        backend = make_backend(site, root / "probe")
        result.status = backend.status()
        if result.status == "offline":
            result.error = "endpoint offline (start it: globus-compute-endpoint start <name>)"
            return result
        transfer = isinstance(store, GlobusTransferStore)  # reported: collection, times
        if transfer:
            result.collection = check_collection(store)
            if result.collection != "ok":
                result.error = result.collection
                return result
        payload = f"ping {time.time()}".encode()
        probe_id = sha256_hex(payload)
        t0 = time.monotonic()
        store.put(probe_id, payload)
        report = store.flush("flwr-hpc sites check")
        if report is not None:
            result.transfer_to_s = report.seconds
        job = {"store": store.spec(), "probe_id": probe_id}
        store.attach(job, [probe_id])
        answer = backend.submit(probe, job).result(timeout=timeout_s)
        if answer.get("store") == "ok":
            t1 = time.monotonic()
            store.receive(answer, [answer["reply_id"]], "flwr-hpc sites check")
            if transfer:
                result.transfer_from_s = time.monotonic() - t1
        result.round_trip_s = time.monotonic() - t0
        result.host = str(answer.get("host", "-"))
        result.store = str(answer.get("store"))
        if result.store != "ok":
            result.error = f"the site cannot use its store {store.spec()}: {result.store}"
        elif store.get(answer["reply_id"]) != b"pong:" + payload:
            result.error = "the probe's reply in the store does not match"
    except TimeoutError:
        result.error = f"no answer within {timeout_s:.0f} s (queued behind a batch job?)"
    except FlwrHpcError as err:
        result.error = str(err)
    except Exception as err:  # noqa: BLE001 - every failure becomes a row, not a traceback
        result.error = f"{type(err).__name__}: {err}"
    finally:
        if backend is not None:
            backend.close()
    return result


def check_collection(store) -> str:
    """``ok``, or why the site's collection cannot hold the store (``operation_ls``)."""
    from flwr_hpc.payload.transfer import explain

    try:
        store.client.operation_ls(store.collection_id, path=store.collection_path, limit=1)
    except Exception as err:  # noqa: BLE001
        if getattr(err, "code", "") == "ClientError.NotFound":
            return "ok"  # reachable; the first transfer creates the directory
        return f"collection {store.collection_id}: {explain(err)}"
    return "ok"


def check_sites(federation: FederationConfig, flwr_home: Path,
                timeout_s: float = 120.0) -> list[SiteCheck]:
    """:func:`check_site` on every site of ``federation``, in parallel, after checking
    that the Globus credentials the federation needs are there (raises if not).
    """
    names = [s.name for s in federation.sites]
    if any(s.compute["type"] == "globus" for s in federation.sites):
        from flwr_hpc.compute.globus import shared_client

        shared_client()  # fails at once, naming the variables, when there are no credentials
    if federation.uses_transfer():
        from flwr_hpc.payload.transfer import transfer_client

        transfer_client([federation.transfer["collection_id"]])  # credentials + server side
    os.environ.setdefault("FLWR_HOME", str(flwr_home))
    with ThreadPoolExecutor(max_workers=max(1, len(names))) as pool:
        return list(pool.map(lambda n: check_site(federation, n, flwr_home, timeout_s), names))
