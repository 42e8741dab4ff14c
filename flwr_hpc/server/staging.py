"""Staging: what goes to a site before its tasks run, and the jobs that point at it.

For one phase, :meth:`Staging.stage` writes to a site's store everything it lacks for the
phase's tasks, each object once (the global model crosses once per site however many
nodes the site hosts), plus each node's ``Context`` and the FAB, then ``flush``es (a
Transfer store moves it all in one transfer task). :meth:`Staging.job` builds the
:class:`~flwr_hpc.protocol.Job` that tells the site worker where to find it.
:meth:`Staging.warm_up` starts every site's workers before the first message.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from flwr.app import Context

from flwr_hpc.config import FederationConfig
from flwr_hpc.payload.objects import Parts, sha256_hex
from flwr_hpc.protocol import JOB_VERSION, context_to_bytes
from flwr_hpc.server.sites import SiteRuntime
from flwr_hpc.server.tasks import Task

log = logging.getLogger("flwr_hpc")


class Staging:
    """Stages payloads and builds jobs for the sites of one run."""

    def __init__(self, sites: dict[str, SiteRuntime], fab_bytes: bytes,
                 run_id: Callable[[], int]) -> None:
        self.sites = sites
        self.fab_bytes = fab_bytes
        self.fab_hash = sha256_hex(fab_bytes)
        self._run_id = run_id

    def job(self, site: str, **fields: Any) -> dict[str, Any]:
        """A job for ``site`` (a :class:`~flwr_hpc.protocol.Job`) with ``fields``."""
        rt = self.sites[site]
        return {"v": JOB_VERSION, "run_id": self._run_id(), "site": site,
                "fab_hash": self.fab_hash, "store": rt.store.spec(),
                "apps_dir": str(rt.apps_dir), **fields, **rt.job_extras}

    def stage(self, site: str, tasks: list[Task], parts: dict[str, Parts],
              context_of: Callable[[int], Context], label: str) -> None:
        """Write everything ``site`` lacks for these tasks, each object once.
        ``parts``: every object of the phase by id; ``context_of(node_id)``: the Context
        each node's ClientApp receives.
        """
        rt = self.sites[site]
        t0 = time.monotonic()
        written = 0
        if not rt.store.has(self.fab_hash):  # attributed to the first task of the site
            written += rt.store.put(self.fab_hash, self.fab_bytes)
        before = 0
        seen: set[str] = set()
        for t in tasks:
            for oid in t.object_ids:  # the message's objects, children first
                if oid not in seen and not rt.store.has(oid):
                    # the id was computed from these very bytes: no second hash
                    written += rt.store.put(oid, parts[oid], trusted=True)
                seen.add(oid)
            ctx_bytes = context_to_bytes(context_of(t.node.node_id))
            t.context_id = sha256_hex(ctx_bytes)
            written += rt.store.put(t.context_id, ctx_bytes, trusted=True)
            t.object_ids = [*t.object_ids, t.context_id, self.fab_hash]
            t.bytes_to_site = written - before
            before = written
        if tasks:  # a Transfer store moves all of it in one transfer task
            rt.store.flush(label)
        elapsed = time.monotonic() - t0
        for t in tasks:
            t.stage_s = elapsed

    def prestage(self, site: str, parts: dict[str, Parts], label: str) -> None:
        """Move ``parts`` (a new message's objects: usually the next global model) to
        ``site`` while it still runs earlier messages, so the message that will carry
        them there starts without a staging wait (a store that reads the server's writes
        directly has nothing to do; a Transfer store skips small objects, objects the site
        holds, and pre-staging when Transfer's active-task slots are taken).
        """
        t0 = time.monotonic()
        try:
            report = self.sites[site].store.prestage(parts, label)
        except Exception as err:  # noqa: BLE001 - only an optimisation: the message stages
            log.warning("pre-staging to site '%s' failed: %s", site, err)
            return
        if report is not None:
            log.info("site '%s': pre-staged %d object(s), %s bytes, in %.1f s", site,
                     report.files, f"{report.bytes:,}", time.monotonic() - t0)

    def warm_up(self, federation: FederationConfig, worker_fn: Callable[[dict], dict],
                label: str) -> dict[str, str]:
        """Start every site's workers and load the run's ClientApp in them: one warm-up
        task per worker (``compute.workers``), waiting at most ``compute.warmup_s`` per
        site (0: no warm-up). Returns each site's outcome (``ok``, ``skipped``, ``still
        starting``, or the error); a failing site is reported, not fatal.
        """
        outcome: dict[str, str] = {}
        waits: dict[str, tuple[list[Future], float]] = {}
        t0 = time.monotonic()
        for name, rt in self.sites.items():
            site = federation.site(name)
            budget = float(site.compute.get("warmup_s", 0.0))
            if budget <= 0 or site.compute["type"] == "sim":
                outcome[name] = "skipped"
                continue
            futures: list[Future] = []
            try:
                if not rt.store.has(self.fab_hash):
                    rt.store.put(self.fab_hash, self.fab_bytes)
                rt.store.flush(label)
                job = self.job(name, warmup=True)
                rt.store.attach(job, [self.fab_hash])
                if rt.backend.status() == "offline":
                    raise RuntimeError("the site's endpoint is offline")
                for _ in range(max(1, int(site.compute.get("workers", 1)))):
                    futures.append(rt.backend.submit(worker_fn, job))
            except Exception as err:  # noqa: BLE001 - the site's tasks will say it again
                outcome[name] = f"failed: {err}"
                continue
            waits[name] = (futures, t0 + budget)
        if waits:
            log.info("warming up %d site(s): starting workers and loading the ClientApp",
                     len(waits))
        for name, (futures, deadline) in waits.items():
            errors: list[str] = []
            for fut in futures:
                try:
                    res = fut.result(timeout=max(0.0, deadline - time.monotonic()))
                except TimeoutError:
                    errors.append("still starting")
                    continue
                except Exception as err:  # noqa: BLE001
                    errors.append(str(err))
                    continue
                if not (isinstance(res, dict) and res.get("ok")):
                    errors.append(str((res or {}).get("reason", res)))
            outcome[name] = errors[0] if errors else "ok"
            if errors:
                log.warning("site '%s' warm-up: %s", name, errors[0][-500:])
        if waits:
            log.info("site workers warm after %.1f s (%s)", time.monotonic() - t0,
                     ", ".join(f"{k}: {v.splitlines()[0][:60]}" for k, v in outcome.items()))
        return outcome
