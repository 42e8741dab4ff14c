"""Shared fixtures: an isolated FLWR_HOME, the fixture app's FAB, and a run helper."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import psutil
import pytest

TESTS_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS_DIR))  # helpers importable in spawned site workers too

from helpers import APP_DIR, REPO_ROOT, child_python_processes, cli, free_port  # noqa: E402

MAX_XDIST_WORKERS = 4


def pytest_xdist_auto_num_workers(config) -> int:
    """``-n auto``: one test process per usable core plus one (the end-to-end tests spend
    part of their time waiting on processes they start), at most 4."""
    return max(1, min(MAX_XDIST_WORKERS, len(os.sched_getaffinity(0)) + 1))


def pytest_configure(config) -> None:
    """Under pytest-xdist, test processes must not fight over cores with oversubscribed
    OpenMP pools (which slows torch down several-fold). With a core per test process,
    each gets its own (its affinity mask, inherited by every process it starts, from which
    flwr-hpc sizes its local workers' thread pools); with more test processes than cores,
    each torch runs one thread and the kernel balances the processes."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
    if not worker.startswith("gw") or count < 2:
        return
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) >= count:
        share = cpus[int(worker[2:])::count]
        os.sched_setaffinity(0, share)
        os.environ["OMP_NUM_THREADS"] = str(len(share))
    else:
        os.environ["OMP_NUM_THREADS"] = "1"


# Seconds each file took in a parallel run on 2 cores (the sum of its tests' durations,
# from `pytest --durations=0`): the order in which files are handed out. Refresh when a
# file grows a lot; a file not listed counts the sum of its tests' slow(seconds) marks,
# else 2 s per test.
FILE_SECONDS = {
    "tests/integration/test_exascale_study.py": 380,
    "tests/integration/test_scheduler_runs.py": 230,
    "tests/integration/test_lora_job.py": 290, "tests/integration/test_compat.py": 220,
    "tests/faults/test_resume.py": 158, "tests/faults/test_lifecycle.py": 157,
    "tests/integration/test_bench_schedulers.py": 160, "tests/unit/test_models.py": 137,
    "tests/integration/test_access.py": 122, "tests/integration/test_lora_ranks.py": 89,
    "tests/integration/test_bench.py": 81, "tests/integration/test_grid.py": 68,
    "tests/integration/test_flwr_verbs.py": 60, "tests/integration/test_globus_compute.py": 35,
    "tests/faults/test_faults.py": 33, "tests/integration/test_cli_e2e.py": 33,
}


def pytest_collection_modifyitems(config, items) -> None:
    """The longest files first (stable otherwise): pytest-xdist hands out whole files in
    this order (``--no-loadscope-reorder``), so the longest ones start at once instead of
    last (see :data:`FILE_SECONDS`)."""
    weight: dict[str, float] = {}
    order: dict[str, int] = {}
    for item in items:
        path = item.nodeid.split("::")[0]
        mark = item.get_closest_marker("slow")
        seconds = (float(mark.args[0]) if mark.args else 20.0) if mark else 2.0
        weight[path] = weight.get(path, 0.0) + seconds
        order.setdefault(path, len(order))
    for path in weight:
        weight[path] = FILE_SECONDS.get(path, weight[path])
    items.sort(key=lambda it: (-weight[it.nodeid.split("::")[0]],
                               order[it.nodeid.split("::")[0]]))


@pytest.fixture
def flwr_home(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "flwr_home"
    home.mkdir()
    monkeypatch.setenv("FLWR_HOME", str(home))
    return home


@pytest.fixture(scope="session")
def quickstart_fab() -> bytes:
    from flwr_hpc.fab import build_fab

    return build_fab(APP_DIR)


@pytest.fixture(scope="session")
def lora_fab() -> bytes:
    """The repository itself as a Flower app (what `flwr run . hpc` ships)."""
    from flwr_hpc.fab import build_fab

    return build_fab(REPO_ROOT)


@pytest.fixture(scope="session")
def lora_app(lora_fab, tmp_path_factory) -> Path:
    """The repository's Flower app without the rest of the repository: its FAB's files,
    ``pyproject.toml`` and ``.gitignore`` copied to a directory of their own, from which
    ``flwr run . hpc`` ships the same FAB (asserted) as from the repository -- where
    Flower's CLI walks and resolves every file of ``.venv`` first (about 5 s of CPU per
    ``flwr run``; :func:`flwr_hpc.fab.build_fab` avoids it, Flower's CLI cannot).
    """
    import io
    import shutil
    import zipfile

    from flwr_hpc.fab import build_fab

    root = tmp_path_factory.mktemp("lora-app")
    with zipfile.ZipFile(io.BytesIO(lora_fab)) as zf:
        names = [n for n in zf.namelist() if not n.startswith(".info/")]
    for name in {*names, ".gitignore"}:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO_ROOT / name, root / name)
    assert build_fab(root) == lora_fab
    return root


@pytest.fixture
def run_lora_job(flwr_home, lora_fab):
    """Run the LoRA job through the real runner; return (status, run_dir, metrics rows)."""
    from flwr_hpc.config import FederationConfig, load_federation
    from flwr_hpc.server.runner import execute_run
    from flwr_hpc.server.runs import prepare_run

    def _run(overrides: str | dict, federation: FederationConfig | None = None,
             federation_overrides: list[str] | None = None):
        """``overrides``: the job's Hydra overrides, or a whole run config (a dict)."""
        fed = federation or load_federation(federation_overrides or [])
        run_config = overrides if isinstance(overrides, dict) else {"overrides": overrides}
        run_dir = prepare_run(lora_fab, run_config, fed)
        status = execute_run(run_dir)
        path = run_dir / "metrics.jsonl"
        rows = [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []
        return status, run_dir, rows

    return _run


@pytest.fixture
def run_quickstart(flwr_home, quickstart_fab, tmp_path):
    """Run the fixture app through the real runner; return (status, run_dir, summary)."""
    from flwr_hpc.config import FederationConfig, load_federation
    from flwr_hpc.server.runner import execute_run
    from flwr_hpc.server.runs import prepare_run

    def _run(run_config: dict | None = None, overrides: list[str] | None = None,
             federation: FederationConfig | None = None):
        result_file = tmp_path / f"result-{len(list(tmp_path.glob('result-*')))}.json"
        cfg = {"result-file": str(result_file)}
        cfg.update(run_config or {})
        fed = federation or load_federation(overrides or [])
        run_dir = prepare_run(quickstart_fab, cfg, fed)
        status = execute_run(run_dir)
        summary = json.loads(result_file.read_text()) if result_file.exists() else None
        return status, run_dir, summary

    return _run


@pytest.fixture(autouse=True)
def _no_leftover_processes():
    yield
    leftovers = child_python_processes()
    for p in leftovers:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    assert not leftovers, f"processes left behind: {[p.pid for p in leftovers]}"


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def superlink(flwr_home):
    """``flwr-hpc up`` on a free port in this test's FLWR_HOME; ``flwr-hpc down`` after."""
    port = free_port()
    up = cli("flwr-hpc", "up", "--port", str(port))
    assert up.returncode == 0, up.stderr
    yield port
    cli("flwr-hpc", "down")


@pytest.fixture(scope="session", autouse=True)
def _model_cache(tmp_path_factory):
    """Tiny models are built once per test session (workers inherit the variable)."""
    path = tmp_path_factory.mktemp("model-cache")
    old = os.environ.get("FLWR_HPC_MODEL_CACHE")
    os.environ["FLWR_HPC_MODEL_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("FLWR_HPC_MODEL_CACHE", None)
    else:
        os.environ["FLWR_HPC_MODEL_CACHE"] = old


@pytest.fixture
def rsps():
    """One HTTP mock for every faked Globus service of a test."""
    import responses

    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        yield mock


@pytest.fixture
def cloud(rsps, tmp_path, monkeypatch):
    """The Globus Compute cloud, faked at its HTTP and AMQP edges (tests/fake_globus.py)."""
    from fake_globus import FakeComputeCloud, make_client, reset_sdk_globals
    from globus_compute_sdk.sdk.executor import _ResultWatcher

    from flwr_hpc.compute import globus as gc

    fake = FakeComputeCloud(tmp_path / "cloud", result_latency_s=0.05)
    monkeypatch.setattr(_ResultWatcher, "_connect", lambda self: fake.connect(self))
    fake.install(rsps)
    gc.set_shared_client(make_client())
    yield fake
    gc.set_shared_client(None)
    reset_sdk_globals()
    fake.close()


@pytest.fixture
def tcloud(rsps):
    """The Globus Transfer service, faked at its HTTP edge (tests/fake_transfer.py)."""
    from fake_transfer import FakeTransferCloud, make_transfer_client

    from flwr_hpc.payload import transfer as gt

    fake = FakeTransferCloud()
    fake.install(rsps)
    gt.set_transfer_client(make_transfer_client())
    yield fake
    gt.set_transfer_client(None)


@pytest.fixture
def grid_factory(flwr_home, quickstart_fab, tmp_path):
    """HPCGrids over the quickstart FAB, closed at teardown (attributes set from kwargs)."""
    from flwr.supercore.run import Run
    from flwr.supercore.task_identity import TaskIdentity

    from flwr_hpc.server.wiring import make_grid

    grids = []

    def make(fed, **kwargs):
        grid = make_grid(fed, quickstart_fab, run_dir=tmp_path / "run",
                                       flwr_home=flwr_home,
                                       run_config={"fail-partition": -1, "sleep-partition": -1,
                                                   "sleep-s": 0.0, "sleep-round": -1})
        for k, v in kwargs.items():
            setattr(grid, k, v)
        grid.set_run(Run.create_empty(4242))
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 4242, 1, 1
        grids.append(grid)
        return grid

    yield make
    for g in grids:
        g.close()
