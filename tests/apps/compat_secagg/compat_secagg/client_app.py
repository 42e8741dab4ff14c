"""SecAgg+: a NumPyClient behind Flower's secaggplus_mod. One planned dropout: partition
`drop-partition` raises in round `drop-round` (the server must unmask without it)."""

import numpy as np
from flwr.client import ClientApp, NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.common import Context


class Client(NumPyClient):
    def __init__(self, partition_id: int, drop_partition: int, drop_round: int) -> None:
        self.pid = partition_id
        self.drop = (drop_partition, drop_round)

    def fit(self, parameters, config):
        server_round = int(config["server_round"])
        if (self.pid, server_round) == self.drop:
            raise RuntimeError(f"partition {self.pid} drops out in round {server_round}")
        new = [p + (self.pid + 1) * 0.1 + server_round * 0.01 for p in parameters]
        return new, 10 * (self.pid + 1), {}

    def evaluate(self, parameters, config):
        return float(sum(np.abs(p).sum() for p in parameters)), 1, {}


def client_fn(context: Context):
    cfg = context.run_config
    return Client(int(context.node_config["partition-id"]), int(cfg.get("drop-partition", 3)),
                  int(cfg.get("drop-round", 2))).to_client()


app = ClientApp(client_fn=client_fn, mods=[secaggplus_mod])
