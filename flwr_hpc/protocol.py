"""The wire contract between the server and a site: what both sides read and write.

A site task is ``flwr_hpc.worker.run_task(job) -> result``, shipped *by reference* and
serialized with :func:`task_serializer` (code by reference, data as JSON). ``job`` and
``result`` are plain JSON objects whose fields are listed here; a node's ``Context``
travels as Flower's protobuf (:func:`context_to_bytes`). Environment variables and run
config keys that both sides read are named here too.

Both sides import this module; it imports neither (only Flower and the Globus Compute
serializer). Change ``JOB_VERSION`` whenever a field changes meaning: a site refuses a
job of another version instead of misreading it.
"""

from __future__ import annotations

from typing import Any, TypedDict

from flwr.app import Context
from flwr.common.serde import context_from_proto, context_to_proto
from flwr.proto.message_pb2 import Context as ProtoContext  # pylint: disable=E0611
from globus_compute_sdk.serialize import ComputeSerializer, JSONData

JOB_VERSION = 1

# Results and arguments travel as JSON: the server never unpickles anything a site sent.
RESULT_SERIALIZERS = [f"{JSONData.__module__}.{JSONData.__name__}"]

# A Context up to this size also travels back inside the task result (base64), so the
# server updates the node's Context as soon as the task ends, with no store round trip.
INLINE_CONTEXT_BYTES = 1 << 20

# --- environment variables
# Set by a site's admin in the endpoint's environment (e.g. its worker_init): the FABs this
# site runs, as sha256 hashes (and "publisher/*" or "publisher/name" entries, see below),
# separated by commas or spaces. Unset: any FAB the server sends. The server cannot change it.
ENV_ALLOWED_FABS = "FLWR_HPC_ALLOWED_FABS"
# "publisher/*" and "publisher/name" entries compare names the FAB gives itself (not
# authenticated); they admit FABs only when the site's admin also sets this to 1.
ENV_ALLOW_BY_NAME = "FLWR_HPC_ALLOW_FABS_BY_NAME"
# Set for the ServerApp while it runs: where it may write outputs (adapters, metrics).
ENV_RUN_DIR = "FLWR_HPC_RUN_DIR"

# --- run config keys a scheduler-aware strategy sets per node and a ClientApp reads
LOCAL_STEPS_KEY = "local-steps"
LR_SCALE_KEY = "lr-scale"


class Job(TypedDict, total=False):
    """What the server sends with every site task (JSON)."""

    v: int                # JOB_VERSION
    run_id: int
    site: str
    fab_hash: str         # sha256 of the run's FAB, in the store
    store: dict[str, Any]  # the site's payload store spec (flwr_hpc.payload.open_store)
    apps_dir: str         # where the site installs FABs
    node_id: int
    message_id: str       # sha256 object id of the message, in the store
    context_id: str       # sha256 object id of the node's Context, in the store
    warmup: bool          # a warm-up task: load the ClientApp, run nothing
    threads: int          # CPU threads this task may use
    launcher: dict[str, Any]  # the site's launcher section (flwr_hpc.worker.launch)
    objects: dict[str, str]   # inline stores: the objects themselves (base64)
    probe_id: str         # `flwr-hpc sites check`: the object to read back


class Result(TypedDict, total=False):
    """What a site task returns (JSON)."""

    ok: bool
    message_id: str
    reply_id: str         # sha256 object id of the reply message, in the store
    reply_bytes: int
    reply_scope: str      # filesystem stores: the reply's objects are under replies/<this>
    reply_pack: dict[str, list[int]]  # ... in one file: {object id: [offset, length]}
    context_id: str | None  # the node's Context after the ClientApp ran (None: unchanged)
    context: str          # ... inline (base64), when small
    object_ids: list[str]  # every object the server must read
    objects: dict[str, str]  # inline stores: the reply objects (base64)
    file_reply: bool      # an inline reply too large for the result, written as files
    error_code: int       # flwr.common.constant.ErrorCode, when not ok
    reason: str
    started_at: float     # the site's clock
    finished_at: float
    fetch_s: float
    load_s: float
    app_s: float
    pid: int              # the worker process
    ranks: int
    launcher: str
    warmup: bool


def task_serializer() -> ComputeSerializer:
    """Serializer for task submission: code by reference (DillCode), data as JSON."""
    return ComputeSerializer(strategy_data=JSONData())


def context_to_bytes(context: Context) -> bytes:
    """A node's ``Context`` as Flower's serialized protobuf."""
    return context_to_proto(context).SerializeToString()


def context_from_bytes(data: bytes) -> Context:
    """The ``Context`` that :func:`context_to_bytes` serialized to ``data``."""
    return context_from_proto(ProtoContext.FromString(data))
