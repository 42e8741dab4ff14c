"""ServerApp: Flower's FedAvg for a few rounds; optionally writes a JSON summary."""

import json

import numpy as np
from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from quickstart_numpy.task import get_model

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    num_nodes = len(list(grid.get_node_ids()))
    strategy = FedAvg(fraction_train=1.0, fraction_evaluate=1.0,
                      min_train_nodes=1, min_evaluate_nodes=1, min_available_nodes=num_nodes)
    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(get_model(float(cfg["model-size-mb"]))),
        num_rounds=int(cfg["num-server-rounds"]),
        timeout=float(cfg["timeout-s"]),
    )
    if cfg["result-file"]:
        final = result.arrays.to_numpy_ndarrays()
        summary = {
            "num_nodes": num_nodes,
            "final_first": [float(a.ravel()[0]) for a in final],
            "final_mean": [float(np.mean(a)) for a in final],
            "train_metrics": {str(r): dict(m) for r, m in result.train_metrics_clientapp.items()},
            "evaluate_metrics": {str(r): dict(m)
                                 for r, m in result.evaluate_metrics_clientapp.items()},
        }
        with open(str(cfg["result-file"]), "w") as fh:
            json.dump(summary, fh)
