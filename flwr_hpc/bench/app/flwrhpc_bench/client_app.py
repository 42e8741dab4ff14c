"""Return the received arrays plus noise (no training: transport cost only).

The noise is one random offset per tensor and client: every reply is different bytes (no
deduplication anywhere), while the app itself costs a copy and an add, so the benchmark
measures the transport, not numpy's random-number generator (per-element normal noise on
64 MB takes longer than moving it)."""

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
        values = arr.numpy()  # a fresh array (Flower's API copies)
        values += rng.standard_normal(dtype=np.float32) * np.float32(1e-3)
        out[key] = Array(values)
    metrics = MetricRecord({"num-examples": 1 + pid})
    return Message(RecordDict({"arrays": ArrayRecord(out), "metrics": metrics}), reply_to=msg)
