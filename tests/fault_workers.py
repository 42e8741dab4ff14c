"""Site-worker wrappers that inject faults (module-level so they ship by reference)."""

from __future__ import annotations

from flwr_hpc.payload.store import open_store
from flwr_hpc.worker import run_task


def _corrupt(store, oid: str) -> None:
    path = store.objects_dir / oid[:2] / oid
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def corrupt_reply(job: dict) -> dict:
    """Run normally, then flip a byte of the reply's root object at the site."""
    result = run_task(job)
    if result.get("ok"):
        store, pack = open_store(job["store"]), result.get("reply_pack") or {}
        if result["reply_id"] in pack:  # a packed reply (payload.reply_files.ReplyScope)
            offset, length = pack[result["reply_id"]]
            path = store.for_reply(result["reply_scope"], pack).pack_path
            data = bytearray(path.read_bytes())
            data[offset + length - 1] ^= 0xFF
            path.write_bytes(bytes(data))
        else:
            _corrupt(store, result["reply_id"])
    return result


def corrupt_input(job: dict) -> dict:
    """Flip a byte of the staged message before the worker reads it."""
    _corrupt(open_store(job["store"]), job["message_id"])
    return run_task(job)


def crash_first_task(job: dict) -> dict:
    """At the site named by FLWR_HPC_TEST_CRASH_SITE, the worker process of the first task
    dies (as on OOM or a lost node), FLWR_HPC_TEST_CRASH_AFTER_S seconds after it starts."""
    import os
    import time
    from pathlib import Path

    marker = Path(job["apps_dir"]).parent / "crashed-once"
    if job["site"] == os.environ.get("FLWR_HPC_TEST_CRASH_SITE") and not marker.exists():
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(str(job["node_id"]))
        time.sleep(float(os.environ.get("FLWR_HPC_TEST_CRASH_AFTER_S", "0")))
        os._exit(9)
    return run_task(job)


_PREVIOUS: dict[int, dict] = {}


def _reply_reader(store, result: dict):
    """Read a result's reply as the server does: through its scope and pack, if any."""
    if result.get("reply_scope"):
        return store.for_reply(result["reply_scope"], result.get("reply_pack")).get
    return store.get


def stale_reply(job: dict) -> dict:
    """From the second task on, answer with the reply this node sent to the previous one
    (a stale reply arriving for a newer message): its objects written again, as a site
    replaying an old reply would (the server has removed the old reply's own files)."""
    result = run_task(job)
    store = open_store(job["store"])
    previous = _PREVIOUS.get(job["node_id"])
    if result.get("ok"):
        read = _reply_reader(store, result)
        _PREVIOUS[job["node_id"]] = {"reply_id": result["reply_id"], "objects": {
            oid: read(oid) for oid in result["object_ids"] if oid != result.get("context_id")}}
    if previous is not None and result.get("ok"):
        for oid, data in previous["objects"].items():
            store.put(oid, data)
        result.update(reply_id=previous["reply_id"], object_ids=list(previous["objects"]))
    return result


def bad_reply(job: dict) -> dict:
    """Rewrite a node's train reply to break a strategy's expectations; which node and how
    comes from FLWR_HPC_TEST_BAD (``partition:kind,...``; kinds: no-weight, nan, shape,
    zero-weight, two-arrays, metric-keys)."""
    import os

    import numpy as np
    from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

    from flwr_hpc.payload.objects import inflate_message, message_objects

    result = run_task(job)
    store = open_store(job["store"])
    request = inflate_message(job["message_id"], store.get)
    pid = None
    reply = (inflate_message(result["reply_id"], _reply_reader(store, result))
             if result.get("ok") else None)
    if reply is None or reply.has_error() or request.metadata.message_type != "train":
        return result
    metrics = dict(reply.content["metrics"])
    pid = int(metrics["partition-id"])
    kinds = dict(item.split(":") for item in os.environ.get("FLWR_HPC_TEST_BAD", "").split(",")
                 if item)
    kind = kinds.get(str(pid))
    if kind is None:
        return result
    arrays = reply.content["arrays"].to_numpy_ndarrays()
    records = {}
    if kind == "no-weight":
        metrics.pop("num-examples")
    elif kind == "zero-weight":
        metrics["num-examples"] = 0
    elif kind == "nan":
        arrays[0] = arrays[0].copy()
        arrays[0][0] = np.nan
    elif kind == "shape":
        arrays[0] = np.zeros(7, dtype=np.float32)
    elif kind == "two-arrays":
        records["extra"] = ArrayRecord([np.ones(2, dtype=np.float32)])
    elif kind == "metric-keys":
        metrics["surprise"] = 1.0
    content = RecordDict({"arrays": ArrayRecord(arrays), "metrics": MetricRecord(metrics),
                          **records})
    new = Message(content, reply_to=request)
    written = []
    for oid, data in message_objects(new).items():
        store.put(oid, data)
        written.append(oid)
    result.update(reply_id=new.object_id,
                  object_ids=written + [result["context_id"]] if result.get("context_id")
                  else written)
    return result


def skewed_clock(job: dict) -> dict:
    """A site whose clock runs one hour ahead of the server's."""
    result = run_task(job)
    for key in ("started_at", "finished_at"):
        if result.get(key):
            result[key] += 3600.0
    return result
