"""R rounds of FedAvg over S MB of float32 arrays; writes per-round times and peak RSS."""

import json
import os
import resource
import time

import numpy as np
from flwr.app import Array, ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

app = ServerApp()


def model(size_mb: float, tensors: str = "") -> ArrayRecord:
    """``size_mb`` MB of float32 in 8 tensors, or, given ``tensors`` (comma-separated
    element counts), one float32 tensor per count: a real model's layout."""
    rng = np.random.default_rng(0)
    if tensors:
        sizes = [int(n) for n in tensors.split(",")]
    else:
        n = max(8, int(size_mb * 2**20 / 4))
        sizes = [n // 8] * 8
    return ArrayRecord({f"layer{i}": Array(rng.standard_normal(k, dtype=np.float32))
                        for i, k in enumerate(sizes)})


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    rounds, size_mb = int(cfg["rounds"]), float(cfg["size-mb"])
    nodes = len(list(grid.get_node_ids()))
    if bool(cfg["streaming"]):
        from flwr_hpc.strategy.streaming import StreamingFedAvg as Strategy
    else:
        Strategy = FedAvg
    strategy = Strategy(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=nodes,
                        min_available_nodes=nodes, min_evaluate_nodes=0)
    marks = [time.perf_counter()]

    def tick(server_round, arrays):
        marks.append(time.perf_counter())
        if cfg["result-file"]:  # the rounds so far, in case the run dies before the end
            progress = f"{cfg['result-file']}.rounds"
            done = [b - a for a, b in zip(marks[1:], marks[2:], strict=False)]
            with open(progress + ".tmp", "w") as fh:
                json.dump({"round_s": done}, fh)
            os.replace(progress + ".tmp", progress)

    if bool(cfg["streaming"]):  # replies one at a time: the grid's explicit opt-in
        from flwr_hpc.strategy.streaming_grid import StreamingGrid

        grid = StreamingGrid(grid)
    # streaming: Flower's round loop lets the initial model go once round 1 replaced it
    # (nothing here keeps it either), so the server holds one global model, not two
    release = {"release_initial": True} if bool(cfg["streaming"]) else {}
    strategy.start(grid=grid, initial_arrays=model(size_mb, str(cfg.get("tensors", ""))),
                   num_rounds=rounds, timeout=float(cfg["timeout-s"]), evaluate_fn=tick,
                   **release)
    round_s = [b - a for a, b in zip(marks[1:], marks[2:], strict=False)]  # [1]: round 0
    result = {"round_s": round_s, "nodes": nodes,
              "serverapp_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
              * 1024}
    if cfg["result-file"]:
        with open(str(cfg["result-file"]), "w") as fh:
            json.dump(result, fh)
