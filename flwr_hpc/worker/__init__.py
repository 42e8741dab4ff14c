"""The site side: what runs at a facility for every Flower message.

``run_task`` is shipped to the endpoint *by reference* (a ~40-byte dill import reference),
so a site runs only code from its installed flwr-hpc, never code objects from the wire. Its
argument and return value are plain JSON. For each task it:

1. opens the site's payload store and fetches + verifies (sha256) the message objects and
   the node's ``Context``;
2. loads the ClientApp from the run's FAB (installed once per site and cached by hash);
3. runs ``app(message, context)`` -- in this process, or, when the site has a launcher,
   on every rank of a data-parallel group (:mod:`flwr_hpc.worker.launch`); an exception becomes a
   Flower ``Error`` reply, exactly as a SuperNode would report it;
4. writes the reply objects and the updated ``Context`` to the store and returns their ids
   plus timings.

``run_task`` and ``probe`` are *defined here*, so their import references stay
``flwr_hpc.worker.run_task`` and ``flwr_hpc.worker.probe``: sites allow-list those strings.
The package owns FAB loading and the site's allow-list and task execution (``execute``), and
the rank launcher (``launch``). It imports only :mod:`flwr_hpc.protocol`,
:mod:`flwr_hpc.payload`, :mod:`flwr_hpc.fab`, :mod:`flwr_hpc.errors`, :mod:`flwr_hpc.dist`
and :mod:`flwr_hpc._proc` -- never the server side (grid, runner, compute backends).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from flwr.common.constant import ErrorCode

from flwr_hpc._proc import keep_caches_under
from flwr_hpc.payload.objects import check_object_id, sha256_hex
from flwr_hpc.protocol import JOB_VERSION
from flwr_hpc.worker.execute import (
    ARRAYS,
    FabRefusedError,
    execute,
    fab_refusal,
    failure_result,
    limit_threads,
    load_client_app,
    task_store,
)

__all__ = ["ARRAYS", "FabRefusedError", "execute", "fab_refusal", "load_client_app",
           "probe", "run_task", "warm_up"]


def run_task(job: dict[str, Any]) -> dict[str, Any]:
    """Run one Flower message at this site (see module docstring)."""
    started_at = time.time()
    if job.get("v") != JOB_VERSION:
        return failure_result(job, ErrorCode.UNKNOWN,
                              f"job format v{job.get('v')} not understood by this flwr-hpc "
                              f"(expects v{JOB_VERSION}); install the same flwr-hpc version at "
                              "the server and the site", started_at)
    limit_threads(job.get("threads"))
    if job.get("apps_dir"):  # caches at the site's directory, not the account's ~/.cache
        keep_caches_under(Path(job["apps_dir"]).parent / "cache")
    if job.get("warmup"):
        return warm_up(job, started_at)
    launcher = job.get("launcher") or {}
    if launcher.get("type", "none") != "none":
        from flwr_hpc.worker.launch import run_launched

        return run_launched(job, started_at)
    return execute(job, started_at, primary=True)


def warm_up(job: dict[str, Any], started_at: float) -> dict[str, Any]:
    """A warm-up task (``job["warmup"]``): load the run's ClientApp into this worker
    process (install the FAB, import the app and what it imports) and return, so the
    ServerApp's first message finds a warm worker. Runs through ``run_task`` so a site's
    function allow-list needs nothing new.
    """
    try:
        store = task_store(job)
        fab_hash = check_object_id(job["fab_hash"])
        load_client_app(fab_hash, lambda: store.get(fab_hash), Path(job["apps_dir"]),
                        site=str(job.get("site", "")))
    except Exception as err:  # noqa: BLE001 - reported to the server, which goes on
        return failure_result(job, ErrorCode.LOAD_CLIENT_APP_EXCEPTION,
                              f"could not load the ClientApp: {type(err).__name__}: {err}",
                              started_at)
    return {"ok": True, "warmup": True, "pid": os.getpid(), "started_at": started_at,
            "finished_at": time.time()}


def probe(job: dict[str, Any]) -> dict[str, Any]:
    """A tiny site task for ``flwr-hpc sites check``: who runs here, and can it read the
    store? Reads the probe object the server staged and writes one back.
    """
    import platform
    from importlib.metadata import version

    out: dict[str, Any] = {"host": platform.node(), "python": platform.python_version(),
                           "flwr_hpc": version("flwr-hpc"), "started_at": time.time()}
    try:
        store = task_store(job)
        data = store.get(check_object_id(job["probe_id"]))
        reply = f"pong:{data.decode()}".encode()
        out["reply_id"] = sha256_hex(reply)
        store.put(out["reply_id"], reply)
        problem = store.finish(out, job)  # inline: the reply travels in the result
        out["store"] = problem or "ok"
    except Exception as err:  # noqa: BLE001 - the report is the result
        out["store"] = f"{type(err).__name__}: {err}"
    return out
