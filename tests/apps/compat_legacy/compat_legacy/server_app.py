"""Legacy API: ServerApp(server_fn=...) with flwr.server.strategy.FedAvg; the result file
holds the global parameters after every round and which clients took part."""

import json
import os

import numpy as np
from flwr.common import Context, ndarrays_to_parameters
from flwr.server import ServerApp, ServerAppComponents, ServerConfig
from flwr.server.strategy import FedAvg

NUM_ROUNDS = 3


def server_fn(context: Context) -> ServerAppComponents:
    result_file = str(context.run_config.get("result-file") or
                      os.environ.get("COMPAT_RESULT_FILE", ""))
    result: dict = {"params": {}, "fit_pids": {}, "eval_pids": {}, "eval_loss": {}}
    rounds = {"fit": 0, "eval": 0}

    def write() -> None:
        if result_file:
            with open(result_file, "w") as fh:
                json.dump(result, fh)

    def fit_metrics(metrics):
        rounds["fit"] += 1
        result["fit_pids"][rounds["fit"]] = sorted(int(m["pid"]) for _, m in metrics)
        return {}

    def eval_metrics(metrics):
        rounds["eval"] += 1
        result["eval_pids"][rounds["eval"]] = sorted(int(m["pid"]) for _, m in metrics)
        return {}

    def central(server_round, parameters, config):
        result["params"][server_round] = [p.tolist() for p in parameters]
        write()
        return None

    print("compat-legacy: server_fn built the strategy")  # must reach the run's log
    strategy = FedAvg(
        fraction_fit=1.0, fraction_evaluate=1.0, min_fit_clients=4, min_evaluate_clients=4,
        min_available_clients=4,
        initial_parameters=ndarrays_to_parameters([np.zeros(3), np.ones((2, 2))]),
        on_fit_config_fn=lambda r: {"server_round": r},
        fit_metrics_aggregation_fn=fit_metrics, evaluate_metrics_aggregation_fn=eval_metrics,
        evaluate_fn=central,
    )
    return ServerAppComponents(strategy=strategy,
                               config=ServerConfig(num_rounds=NUM_ROUNDS, round_timeout=120))


app = ServerApp(server_fn=server_fn)
