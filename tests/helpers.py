"""Helpers shared by the test suites (plain functions and constants; fixtures live in
``conftest.py``). ``tests/`` is on ``sys.path`` (conftest puts it there), so a test module
of any kind imports them as ``from helpers import …``, and spawned site workers can import
``tests/fault_workers.py`` the same way."""

from __future__ import annotations

import hashlib
import io
import json
import os
import socket
import subprocess
import sys
import zipfile
from pathlib import Path

import psutil

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent
APP_DIR = TESTS_DIR / "apps" / "quickstart_numpy"
BIN = Path(sys.executable).parent


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli(*args: str, cwd: Path | None = None, timeout: float = 180,
        env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a console script of this venv (``flwr``, ``flwr-hpc``) with no stdin."""
    return subprocess.run([str(BIN / args[0]), *args[1:]], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout, stdin=subprocess.DEVNULL, env=env)


def child_python_processes() -> list[psutil.Process]:
    """Live (non-zombie) descendants of this test process."""
    out = []
    me = os.getpid()
    for p in psutil.Process().children(recursive=True):
        try:
            if p.status() == psutil.STATUS_ZOMBIE:
                continue
            # multiprocessing's shared resource tracker lives as long as the interpreter,
            # and so does the forkserver that starts local site workers with their heavy
            # libraries imported (flwr_hpc.compute.local.worker_context): helpers of this
            # process, not leftovers -- the workers it forks are its children and count
            cmd = " ".join(p.cmdline())
            if "multiprocessing.resource_tracker" in cmd:
                continue
            if "multiprocessing.forkserver" in cmd and p.ppid() == me:
                continue
            out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


def read_tasks(run_dir: Path) -> list[dict]:
    """The run's ``tasks.jsonl`` rows ([] when it has none)."""
    path = run_dir / "tasks.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def job_config(*overrides: str) -> dict:
    from strategies.job import compose_job

    return compose_job(list(overrides))


def in_process_federation(clients: int = 2):
    """One site whose clients run one after another in a thread of this process: the
    LoRA stack is imported once, so strategy and DP runs take seconds, not minutes."""
    from flwr_hpc.config import FederationConfig

    return FederationConfig.from_dict({"name": "inproc", "sites": {"a": {
        "clients": clients, "compute": {"type": "local", "engine": "thread-pool", "workers": 1}}}})


def fed_of(sites: dict, engine: str = "process-pool"):
    """A federation of local sites: {site name: clients}."""
    from flwr_hpc.config import FederationConfig

    return FederationConfig.from_dict({
        "name": "t",
        "sites": {name: {"clients": n, "compute": {"engine": engine, "workers": max(1, n)}}
                  for name, n in sites.items()},
    })


def train_messages(grid, server_round: int, nodes=None, arrays=None) -> list:
    """Quickstart train messages for ``nodes`` (default: all) of ``grid``."""
    import numpy as np
    from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

    arrays = arrays if arrays is not None else ArrayRecord([np.zeros(4, dtype=np.float32)])
    content = RecordDict({"arrays": arrays,
                          "config": ConfigRecord({"server-round": server_round})})
    return [Message(content, nid, "train", group_id=str(server_round))
            for nid in (nodes if nodes is not None else grid.get_node_ids())]


def rebuild(fab: bytes, edits: dict[str, bytes]) -> bytes:
    """The FAB with some files replaced or added, its CONTENT manifest kept consistent
    (what an attacker who builds their own FAB can do)."""
    src = zipfile.ZipFile(io.BytesIO(fab))
    files = {i.filename: src.read(i) for i in src.infolist() if i.filename != ".info/CONTENT"}
    files.update(edits)
    manifest = "".join(f"{n},{hashlib.sha256(b).hexdigest()},{len(b) * 8}\n"
                       for n, b in files.items())
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
        zf.writestr(".info/CONTENT", manifest)
    return out.getvalue()


def with_pyproject(fab: bytes, old: str, new: str) -> bytes:
    """The FAB with one edit to its pyproject.toml (manifest kept consistent)."""
    text = zipfile.ZipFile(io.BytesIO(fab)).read("pyproject.toml").decode()
    assert old in text
    return rebuild(fab, {"pyproject.toml": text.replace(old, new).encode()})


def transfer_federation(cloud, tcloud, tmp_path, sites: dict[str, int], **transfer):
    """A federation of Globus Compute sites (fake cloud) whose payloads move by Transfer
    (fake service): one collection per site and one for the server."""
    from flwr_hpc.config import FederationConfig

    server = tcloud.add_collection(tmp_path / "server-coll", name="server")
    spec = {}
    for name, n in sites.items():
        coll = tcloud.add_collection(tmp_path / f"{name}-coll", name=name)
        spec[name] = {
            "clients": n,
            "compute": {"type": "globus", "endpoint_id": cloud.add_endpoint(workers=n)},
            "payload": {"type": "globus-transfer", "collection_id": coll,
                        "collection_path": "/flwr/store",
                        "path": str(tmp_path / f"{name}-coll" / "flwr" / "store")}}
    return FederationConfig.from_dict({"name": "glob", "sites": spec, "transfer": {
        "collection_id": server, "collection_path": "/staging",
        "path": str(tmp_path / "server-coll" / "staging"), "poll_s": 0.05,
        # a fast local fake: a wider budget; every object by Transfer unless asked
        "requests_per_s": 50.0, "inline_max_bytes": 0, **transfer}})


def transfer_store(tcloud, tmp_path, site_entity: str = "GCSv5_guest_collection",
                   **settings):
    """A Transfer store for site 'polaris' on the fake service (a fresh server and site
    collection; the site's of kind ``site_entity``), built on the process's Transfer
    client."""
    from flwr_hpc.payload.transfer import GlobusTransferStore, TransferSettings

    server = tcloud.add_collection(tmp_path / "server-coll", name="server")
    site = tcloud.add_collection(tmp_path / "polaris-coll", name="polaris",
                                 entity_type=site_entity)
    cfg = TransferSettings(collection_id=server, collection_path="/staging",
                           path=str(tmp_path / "server-coll" / "staging"),
                           **{"poll_s": 0.05, "deadline_s": 20, "inline_max_bytes": 0,
                              **settings})
    return GlobusTransferStore("polaris", collection_id=site, collection_path="/flwr/store",
                               site_path=str(tmp_path / "polaris-coll" / "flwr" / "store"),
                               settings=cfg)
