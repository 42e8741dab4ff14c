"""SecAgg+: Flower's DefaultWorkflow with a SecAggPlusWorkflow fit stage (15 s stage
timeout, as in Flower's demo). The result file holds the parameters after every round."""

import json
import os

import numpy as np
from flwr.common import Context, ndarrays_to_parameters
from flwr.server import Grid, LegacyContext, ServerApp, ServerConfig
from flwr.server.strategy import FedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    result_file = str(context.run_config.get("result-file") or
                      os.environ.get("COMPAT_RESULT_FILE", ""))
    result: dict = {"params": {}}

    def central(server_round, parameters, config):
        result["params"][server_round] = [p.tolist() for p in parameters]
        if result_file:
            with open(result_file, "w") as fh:
                json.dump(result, fh)
        return None

    strategy = FedAvg(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=4,
                      min_available_clients=4,
                      initial_parameters=ndarrays_to_parameters([np.zeros(3), np.ones(2)]),
                      on_fit_config_fn=lambda r: {"server_round": r}, evaluate_fn=central)
    legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=3),
                           strategy=strategy)
    # 15 s per stage, as in Flower's demo; the reference run under Flower's simulation
    # (Ray workers cold on a loaded machine) may ask for more with COMPAT_STAGE_TIMEOUT_S
    timeout = float(os.environ.get("COMPAT_STAGE_TIMEOUT_S", "15"))
    workflow = DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(
        num_shares=4, reconstruction_threshold=3, timeout=timeout))
    workflow(grid, legacy)
