"""Message API: train counts its calls in context.state; query reports the count."""

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


def _count(context: Context) -> int:
    record = context.state.config_records.get("counter", ConfigRecord({"n": 0}))
    return int(record["n"])


@app.train()
def train(msg: Message, context: Context) -> Message:
    pid = int(context.node_config["partition-id"])
    n = _count(context) + 1
    context.state["counter"] = ConfigRecord({"n": n})
    x = msg.content["arrays"]["x"].numpy()
    reply = RecordDict({"arrays": ArrayRecord({"x": Array(np.asarray(x * (pid + 1) + n))}),
                        "metrics": MetricRecord({"pid": pid, "n": n})})
    return Message(reply, reply_to=msg)


@app.query()
def query(msg: Message, context: Context) -> Message:
    pid = int(context.node_config["partition-id"])
    return Message(RecordDict({"metrics": MetricRecord({"pid": pid, "n": _count(context)})}),
                   reply_to=msg)
