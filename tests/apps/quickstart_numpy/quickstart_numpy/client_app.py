"""ClientApp: returns the received arrays plus noise; remembers how often it trained."""

import time

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    pid = int(context.node_config["partition-id"])
    if pid == int(context.run_config["fail-partition"]):
        raise RuntimeError(f"partition {pid} fails on purpose")
    server_round = int(msg.content["config"]["server-round"])
    sleep_round = int(context.run_config["sleep-round"])
    if pid == int(context.run_config["sleep-partition"]) and sleep_round in (-1, server_round):
        time.sleep(float(context.run_config["sleep-s"]))

    # context.state persists across rounds on the same node
    state = context.state.config_records.get("history", ConfigRecord({"rounds": 0}))
    rounds_seen = int(state["rounds"]) + 1
    context.state["history"] = ConfigRecord({"rounds": rounds_seen})

    arrays = msg.content["arrays"].to_numpy_ndarrays()
    rng = np.random.default_rng(1000 * pid + int(msg.content["config"]["server-round"]))
    new = [a + rng.normal(0.0, 1.0, a.shape).astype(a.dtype) * 0.01 + (pid + 1) for a in arrays]
    metrics = MetricRecord({
        "num-examples": 10 * (pid + 1),
        "partition-id": pid,
        "rounds-seen": rounds_seen,
        "num-partitions": int(context.node_config["num-partitions"]),
    })
    return Message(RecordDict({"arrays": ArrayRecord(new), "metrics": metrics}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    pid = int(context.node_config["partition-id"])
    arrays = msg.content["arrays"].to_numpy_ndarrays()
    loss = float(np.mean([np.abs(a).mean() for a in arrays]))
    metrics = MetricRecord({"num-examples": 10 * (pid + 1), "eval_loss": loss})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)
