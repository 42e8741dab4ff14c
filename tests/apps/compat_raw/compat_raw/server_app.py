"""Raw Grid use, by `mode`:

- fire-and-forget: push 3 train messages per node and never pull them, then query every
  node's counter (its Context.state must have advanced 3 times);
- threads: 2 rounds of send_and_receive, one thread per node;
- query-len: one query round whose replies are counted with len() and iterated twice.
"""

import json
import os
import threading
import time

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


def _train(node_id: int, value: float) -> Message:
    content = RecordDict({"arrays": ArrayRecord({"x": Array(np.full(3, value))})})
    return Message(content, node_id, MessageType.TRAIN)


def _query(node_id: int) -> Message:
    return Message(RecordDict(), node_id, MessageType.QUERY)


def _counts(replies) -> dict:
    return {int(r.content["metrics"]["pid"]): int(r.content["metrics"]["n"])
            for r in replies if not r.has_error()}


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    mode = str(cfg.get("mode") or os.environ.get("COMPAT_MODE", "fire-and-forget"))
    result_file = str(cfg.get("result-file") or os.environ.get("COMPAT_RESULT_FILE", ""))
    nodes = sorted(grid.get_node_ids())
    for _ in range(600):  # Flower's runtime registers its nodes after the app starts
        if len(nodes) >= int(cfg.get("num-nodes", 4)):
            break
        time.sleep(0.1)
        nodes = sorted(grid.get_node_ids())
    result: dict = {"mode": mode, "nodes": len(nodes)}
    if mode == "fire-and-forget":
        for i in range(3):
            grid.push_messages([_train(n, float(i)) for n in nodes])
        replies = grid.send_and_receive([_query(n) for n in nodes], timeout=120)
        result["counts"] = _counts(replies)
    elif mode == "threads":
        out: dict = {}

        def rounds(node_id: int) -> None:
            got = []
            for r in range(2):
                replies = grid.send_and_receive([_train(node_id, float(r))], timeout=120)
                got.append([(int(m.metadata.src_node_id == node_id),
                             m.content["arrays"]["x"].numpy().tolist(),
                             int(m.content["metrics"]["pid"])) for m in replies])
            out[node_id] = got

        threads = [threading.Thread(target=rounds, args=(n,)) for n in nodes]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        result["by_pid"] = {str(g[0][0][2]): g for g in out.values() if g and g[0]}
        result["threads_done"] = len(out)
    elif mode == "query-len":
        replies = grid.send_and_receive([_query(n) for n in nodes], timeout=120)
        result["len"] = len(replies)
        result["first_pass"] = sorted(_counts(replies))
        result["second_pass"] = sorted(_counts(replies))
    else:
        raise ValueError(f"unknown mode {mode!r}")
    print(f"compat-raw {mode}: done")
    if result_file:
        with open(result_file, "w") as fh:
            json.dump(result, fh)
