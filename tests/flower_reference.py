"""Run a Flower app under Flower's own Simulation Runtime (``flwr.simulation.run_simulation``,
Ray backend), the reference for "same result as Flower".

Run as ``python flower_reference.py APP_DIR NUM_SUPERNODES RESULT_FILE [MODE]`` (in a
process of its own: Ray starts and stops with it). The app's ServerApp writes its result
to ``$COMPAT_RESULT_FILE``; run_simulation passes no run config.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path


def run_reference(app_dir: Path, num_supernodes: int, result_file: Path,
                  mode: str = "", timeout_s: float = 300) -> subprocess.CompletedProcess:
    # Flower's runtime is the reference for results, not for start-up time: its Ray
    # workers start cold inside the app's first stage, so stages get a patient timeout
    env = {**os.environ, "COMPAT_RESULT_FILE": str(result_file), "COMPAT_MODE": mode,
           "COMPAT_STAGE_TIMEOUT_S": "120",
           "RAY_DEDUP_LOGS": "0", "RAY_USAGE_STATS_ENABLED": "0"}
    return subprocess.run([sys.executable, __file__, str(app_dir), str(num_supernodes),
                           str(result_file), mode], capture_output=True, text=True,
                          env=env, timeout=timeout_s, stdin=subprocess.DEVNULL)


def _main(app_dir: str, num_supernodes: str) -> None:
    from flwr.clientapp import ClientApp
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation
    from flwr.supercore.object_ref import load_app

    components = tomllib.loads((Path(app_dir) / "pyproject.toml").read_text())[
        "tool"]["flwr"]["app"]["components"]
    server_app = load_app(components["serverapp"], RuntimeError, app_dir)
    client_app = load_app(components["clientapp"], RuntimeError, app_dir)
    assert isinstance(server_app, ServerApp) and isinstance(client_app, ClientApp)
    run_simulation(server_app=server_app, client_app=client_app,
                   num_supernodes=int(num_supernodes),
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": 1}})


if __name__ == "__main__":
    _main(sys.argv[1], sys.argv[2])
