"""Legacy API: a NumPyClient built by client_fn (Flower's pre-Message-API quickstart)."""

import time

import numpy as np
from flwr.client import ClientApp, NumPyClient
from flwr.common import Context


class Client(NumPyClient):
    def __init__(self, partition_id: int, hang_partition: int) -> None:
        self.pid = partition_id
        self.hang = partition_id == hang_partition

    def fit(self, parameters, config):
        server_round = int(config["server_round"])
        if self.hang:  # a client that never answers (stop tests)
            time.sleep(3600)
        rng = np.random.default_rng(100 * self.pid + server_round)
        new = [p + rng.normal(0.0, 0.1, p.shape) + (self.pid + 1) * 0.01 for p in parameters]
        return new, 10 * (self.pid + 1), {"pid": self.pid}

    def evaluate(self, parameters, config):
        loss = float(sum(np.abs(p).sum() for p in parameters)) * (self.pid + 1)
        return loss, 10 * (self.pid + 1), {"pid": self.pid}


def client_fn(context: Context):
    return Client(int(context.node_config["partition-id"]),
                  int(context.run_config.get("hang-partition", -1))).to_client()


app = ClientApp(client_fn=client_fn)
