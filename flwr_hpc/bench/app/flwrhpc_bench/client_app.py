"""Return the received arrays plus a little noise (no training: transport cost only)."""

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    pid = int(context.node_config.get("partition-id", 0))
    rnd = int(msg.content["config"]["server-round"])
    rng = np.random.default_rng(1000 * rnd + pid)
    arrays = msg.content["arrays"]
    out = {}
    for key, arr in arrays.items():
        values = arr.numpy()
        out[key] = Array(values + rng.standard_normal(values.shape, dtype=np.float32) * 1e-3)
    metrics = MetricRecord({"num-examples": 1 + pid})
    return Message(RecordDict({"arrays": ArrayRecord(out), "metrics": metrics}), reply_to=msg)
