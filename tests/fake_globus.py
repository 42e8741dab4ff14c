"""An offline fake of the Globus Compute cloud that fakes only the HTTP and AMQP edges.

Kept real: ``globus_compute_sdk.Executor`` (batching, throttle, result watcher, poisoning),
``Client`` (with a ``NullAuthorizer``), ``ComputeSerializer``, messagepack ``Task``/``Result``
and a real endpoint engine executing every task through ``execute_task``.

Faked: the web service (``responses`` callbacks for register-function, batch submit, the
AMQP connection URL and endpoint status) and the AMQP connection the result watcher opens
(an in-memory ``SelectConnection`` look-alike with an ioloop thread). Reproduced limits and
failure modes: the 10 MB submit limit (HTTP 413, ``TASK_PAYLOAD_TOO_LARGE``, which poisons
the Executor), the engine's own 10 MiB result limit, result delivery latency, and offline
endpoints (tasks accepted, never run).
"""

from __future__ import annotations

import heapq
import itertools
import json
import threading
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

SUBMIT_LIMIT_BYTES = 10 * 1000 * 1000
BASE = "https://compute.api.globus.org"
JSON = {"Content-Type": "application/json"}


class FakeIOLoop:
    def __init__(self) -> None:
        self._timers: list = []
        self._seq = itertools.count()
        self._cv = threading.Condition()
        self._stopped = False

    def call_later(self, delay: float, cb) -> None:
        with self._cv:
            heapq.heappush(self._timers, (time.monotonic() + delay, next(self._seq), cb))
            self._cv.notify()

    def add_callback_threadsafe(self, cb) -> None:
        self.call_later(0, cb)

    def start(self) -> None:
        while True:
            with self._cv:
                if self._stopped:
                    return
                if not self._timers:
                    self._cv.wait(0.05)
                    continue
                when, _, cb = self._timers[0]
                wait = when - time.monotonic()
                if wait > 0:
                    self._cv.wait(min(wait, 0.05))
                    continue
                heapq.heappop(self._timers)
            cb()

    def stop(self) -> None:
        with self._cv:
            self._stopped = True
            self._cv.notify()


class FakeChannel:
    channel_number = 1

    def __init__(self, connection: FakeConnection, cloud: FakeComputeCloud) -> None:
        self.connection = connection
        self.cloud = cloud
        self.is_open, self.is_closed = True, False
        self._tags = itertools.count(1)
        self._on_message = None
        self.queue = None

    def add_on_close_callback(self, cb) -> None:
        self._on_close = cb

    def add_on_cancel_callback(self, cb) -> None:
        self._on_cancel = cb

    def basic_consume(self, queue: str, on_message_callback) -> str:
        self.queue, self._on_message = queue, on_message_callback
        self.cloud._consume(queue, self)
        return "ctag-1"

    def deliver(self, body: bytes) -> None:
        tag = next(self._tags)
        deliver = SimpleNamespace(delivery_tag=tag)
        self.connection.ioloop.add_callback_threadsafe(
            lambda: self._on_message(self, deliver, SimpleNamespace(
                headers={}, timestamp=int(time.time()), content_type=None), body))

    def basic_ack(self, tag, multiple=False) -> None:
        pass

    def basic_nack(self, tag, requeue=True) -> None:
        pass

    def close(self) -> None:
        self.is_open, self.is_closed = False, True
        self.cloud._unconsume(self)


class FakeConnection:
    params = "amqp://fake"

    def __init__(self, cloud, on_open_callback, on_close_callback) -> None:
        self.cloud = cloud
        self.ioloop = FakeIOLoop()
        self.is_open, self.is_closed = True, False
        self._on_close = on_close_callback
        self.ioloop.add_callback_threadsafe(lambda: on_open_callback(self))

    def channel(self, on_open_callback) -> None:
        ch = FakeChannel(self, self.cloud)
        self.ioloop.add_callback_threadsafe(lambda: on_open_callback(ch))

    def close(self) -> None:
        self.is_open, self.is_closed = False, True


class FakeComputeCloud:
    """The Globus Compute web service + AMQP broker, in memory."""

    def __init__(self, run_dir: Path, result_latency_s: float = 0.0) -> None:
        self.run_dir = Path(run_dir)
        self.result_latency_s = result_latency_s
        self.endpoints: dict[str, dict] = {}
        self.functions: dict[str, str] = {}
        self.submits: list[dict] = []  # what each batch submit carried
        self._queues: dict[str, FakeChannel] = {}
        self._pending: dict[str, list[bytes]] = {}
        self._lock = threading.Lock()

    # -- endpoints
    def add_endpoint(self, workers: int = 1, status: str = "online") -> str:
        from flwr_hpc.compute.local import _make_engine

        ep = str(uuid.uuid4())
        run_dir = self.run_dir / ep
        run_dir.mkdir(parents=True)
        engine = _make_engine("thread-pool", workers, run_dir)
        engine.start(endpoint_id=uuid.UUID(ep), run_dir=str(run_dir))
        self.endpoints[ep] = {"status": status, "engine": engine, "backlog": []}
        return ep

    def set_status(self, ep: str, status: str) -> None:
        self.endpoints[ep]["status"] = status
        if status == "online":
            backlog, self.endpoints[ep]["backlog"] = self.endpoints[ep]["backlog"], []
            for item in backlog:
                self._run(ep, *item)

    def close(self) -> None:
        for ep in self.endpoints.values():
            ep["engine"].shutdown(block=False)

    # -- HTTP edge
    def install(self, rsps) -> None:
        import re

        rsps.add_callback("POST", f"{BASE}/v3/functions", callback=self._register)
        rsps.add_callback("POST", re.compile(rf"{BASE}/v3/endpoints/[^/]+/submit"),
                          callback=self._submit)
        rsps.add_callback("GET", f"{BASE}/v2/get_amqp_result_connection_url",
                          callback=lambda req: (200, JSON, json.dumps({
                              "queue_prefix": "fake_", "connection_url": "amqp://fake/"})))
        rsps.add_callback("GET", re.compile(rf"{BASE}/v2/endpoints/[^/]+/status"),
                          callback=self._status)
        rsps.add_callback("GET", re.compile(rf"{BASE}/v2/version.*"),
                          callback=lambda req: (200, JSON, json.dumps({
                              "api": "1.0", "min_sdk_version": "1.0.0",
                              "min_ep_version": "1.0.0", "sdk_version": "4.19.0"})))

    def _register(self, request):
        body = json.loads(request.body)
        fid = str(uuid.uuid4())
        self.functions[fid] = body["function_code"]
        return 200, JSON, json.dumps({"function_uuid": fid})

    def _status(self, request):
        ep = request.url.rstrip("/").split("/")[-2]
        if ep not in self.endpoints:
            return 404, JSON, json.dumps({"code": "ENDPOINT_NOT_FOUND", "message": ep})
        return 200, JSON, json.dumps({"status": self.endpoints[ep]["status"], "details": {}})

    def _submit(self, request):
        size = len(request.body or b"")
        ep = request.url.rstrip("/").split("/")[-2]
        if size > SUBMIT_LIMIT_BYTES:
            return 413, JSON, json.dumps({
                "code": "TASK_PAYLOAD_TOO_LARGE", "error": "Payload Too Large",
                "message": f"Task payload of {size} bytes exceeds the 10 MB limit"})
        if ep not in self.endpoints:
            return 404, JSON, json.dumps({"code": "ENDPOINT_NOT_FOUND", "message": ep})
        body = json.loads(request.body)
        tg = body.get("task_group_id") or str(uuid.uuid4())
        self.submits.append({"endpoint": ep, "bytes": size, "body": body})
        out: dict[str, list[str]] = {}
        for fid, tasks in body["tasks"].items():
            out[fid] = []
            for args_buf in tasks:
                tid = str(uuid.uuid4())
                out[fid].append(tid)
                item = (tid, tg, self.functions[fid] + args_buf,
                        body.get("resource_specification") or {},
                        body.get("result_serializers"))
                if self.endpoints[ep]["status"] == "online":
                    self._run(ep, *item)
                else:  # an offline endpoint: the service accepts and keeps the task
                    self.endpoints[ep]["backlog"].append(item)
        return 200, JSON, json.dumps({"request_id": str(uuid.uuid4()), "task_group_id": tg,
                                    "endpoint_id": ep, "tasks": out})

    def _run(self, ep, tid, tg, task_buffer, resource_specification, result_serializers):
        from globus_compute_common import messagepack
        from globus_compute_common.messagepack.message_types import Task
        from globus_compute_endpoint.engines import GCFuture

        fut = GCFuture(uuid.UUID(tid))
        packed = messagepack.pack(Task(task_id=uuid.UUID(tid), task_buffer=task_buffer))

        def done(f):
            body = f.result()  # a packed messagepack Result, as the endpoint sends it
            threading.Timer(self.result_latency_s, self._publish, (f"fake_{tg}", body)).start()

        fut.add_done_callback(done)
        self.endpoints[ep]["engine"].submit(
            fut, packed, resource_specification=resource_specification,
            result_serializers=result_serializers)

    # -- AMQP edge
    def _publish(self, queue: str, body: bytes) -> None:
        with self._lock:
            channel = self._queues.get(queue)
            if channel is None:
                self._pending.setdefault(queue, []).append(body)
                return
        channel.deliver(body)

    def _consume(self, queue: str, channel: FakeChannel) -> None:
        with self._lock:
            self._queues[queue] = channel
            pending = self._pending.pop(queue, [])
        for body in pending:
            channel.deliver(body)

    def _unconsume(self, channel: FakeChannel) -> None:
        with self._lock:
            if self._queues.get(channel.queue) is channel:
                del self._queues[channel.queue]

    def break_channels(self, times: int = 3) -> None:
        """The broker closes every consuming channel ``times`` times in quick succession
        (3 within 10 s makes the SDK's result watcher give up on all its futures)."""
        with self._lock:
            channels = list(self._queues.values())
        for ch in channels:
            for _ in range(times):
                ch.connection.ioloop.add_callback_threadsafe(
                    lambda ch=ch: ch._on_close(ch, RuntimeError("broker closed the channel")))

    def connect(self, watcher) -> FakeConnection:
        """Stands in for ``_ResultWatcher._connect`` (the SDK's own URL request is kept)."""
        res = watcher.client.get_result_amqp_url()
        watcher._queue_prefix = res["queue_prefix"]
        return FakeConnection(self, watcher._on_connection_open, watcher._on_connection_closed)


def make_client():
    """A real ``globus_compute_sdk.Client`` with no auth and no version check."""
    import globus_sdk
    from globus_compute_sdk import Client

    return Client(authorizer=globus_sdk.NullAuthorizer(), do_version_check=False)


def reset_sdk_globals() -> None:
    from globus_compute_sdk.sdk import executor as ex

    for watcher in list(ex._RESULT_WATCHERS.values()):
        try:
            watcher.shutdown()
        except Exception:  # noqa: BLE001
            pass
    ex._RESULT_WATCHERS.clear()
    ex.Executor._default_task_group_id = None
