"""An offline fake of the Globus Transfer service that fakes only the HTTP edge.

Kept real: ``globus_sdk.TransferClient`` (request building, ``submission_id`` handling,
``TransferData``, retries, ``TransferAPIError`` parsing) and every byte the transfers move.

Faked: the Transfer REST API v0.10 (``responses`` callbacks) over *collections* that are
local directories. Reproduced behaviours (docs.globus.org/api/transfer/task_behavior and
the reference sheet): ``submission_id`` idempotency, at most 3 ACTIVE tasks per user (the
rest wait, nice_status ``Queued``), a setup latency before any byte moves, tasks polled
with ``get_task``, ``sync_level=checksum`` skipping identical files, ``verify_checksum``
catching in-flight corruption (a fault, then a retry), ``task_list`` filtered by up to 50
task ids, a missing source that keeps the task
ACTIVE with growing ``faults`` until its deadline (globus-cli#1056), FAILED tasks with a
``fatal_error``, INACTIVE tasks, ``ConsentRequired`` (403) on submit for collections that
want a ``data_access`` consent, ``cancel_task``, ``task_event_list``, ``get_endpoint``,
``operation_ls`` and label validation (400). With :attr:`FakeTransferCloud.auth` set (a
``tests/fake_auth.FakeGlobusAuth``), every request's bearer token is checked: an unknown or
expired one is answered 401, as the service does.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
import shutil
import threading
import time
import uuid
from pathlib import Path
from urllib.parse import parse_qs, urlparse

BASE = "https://transfer.api.globus.org/v0.10"
JSON = {"Content-Type": "application/json"}
MAX_ACTIVE = 3
TASK_LIST_MAX_IDS = 50
_LABEL_OK = re.compile(r"[A-Za-z0-9 _,.\-]{0,128}")


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _error(status: int, code: str, message: str, **extra):
    body = {"code": code, "message": message, "request_id": uuid.uuid4().hex[:9],
            "resource": "/v0.10", **extra}
    return status, JSON, json.dumps(body)


class FakeTransferCloud:
    """The Transfer service for one user, in memory, moving files between local dirs."""

    def __init__(self, setup_s: float = 0.0) -> None:
        self.setup_s = setup_s
        self.collections: dict[str, dict] = {}
        self.tasks: dict[str, dict] = {}
        self.submissions: dict[str, str] = {}  # submission_id -> task_id
        self.submitted: list[dict] = []        # accepted transfer documents
        self.requests: list[tuple[str, str]] = []
        self.request_times: list[float] = []   # monotonic time of every request
        self.auth = None                       # a FakeGlobusAuth: tokens are checked (401)
        self.refused = 0                       # requests answered 401
        self.fail_submits = 0                  # next N submits answer 502 (a flaky service)
        self.corrupt_once: set[str] = set()    # destination names corrupted on first copy
        self._lock = threading.RLock()

    # -- set-up
    def add_collection(self, root: Path, *, entity_type: str = "GCSv5_guest_collection",
                       high_assurance: bool = False, name: str = "") -> str:
        cid = str(uuid.uuid4())
        Path(root).mkdir(parents=True, exist_ok=True)
        self.collections[cid] = {"root": Path(root), "entity_type": entity_type,
                                 "high_assurance": high_assurance, "name": name or cid[:8],
                                 "offline": False, "deny": False, "consent": False,
                                 "inactive": False}
        return cid

    def path(self, cid: str, path: str) -> Path:
        root = self.collections[cid]["root"]
        full = (root / path.lstrip("/")).resolve()
        if root.resolve() not in (full, *full.parents):
            raise ValueError(f"path {path!r} escapes collection {cid}")
        return full

    # -- HTTP edge
    def install(self, rsps) -> None:
        def cb(method, pattern, fn):
            rsps.add_callback(method, re.compile(BASE + pattern), callback=self._logged(fn))

        cb("GET", r"/submission_id", self._submission_id)
        cb("POST", r"/transfer$", self._submit)
        cb("GET", r"/task/[^/]+$", self._get_task)
        cb("GET", r"/task_list.*", self._task_list)
        cb("POST", r"/task/[^/]+/cancel$", self._cancel)
        cb("GET", r"/task/[^/]+/event_list.*", self._event_list)
        cb("GET", r"/endpoint/[^/?]+$", self._get_endpoint)
        cb("GET", r"/operation/endpoint/[^/]+/ls.*", self._ls)

    def _logged(self, fn):
        def inner(request):
            with self._lock:
                self.requests.append((request.method, urlparse(request.url).path))
                self.request_times.append(time.monotonic())
                if self.auth is not None and not self.auth.check(
                        request.headers.get("Authorization"), "transfer.api.globus.org"):
                    self.refused += 1
                    return _error(401, "AuthenticationFailed", "Token is not active")
                return fn(request)
        return inner

    def calls(self, method: str, fragment: str) -> int:
        return sum(1 for m, p in self.requests if m == method and fragment in p)

    # -- endpoints
    def _submission_id(self, request):
        return 200, JSON, json.dumps({"DATA_TYPE": "submission_id",
                                      "value": str(uuid.uuid4())})

    def _get_endpoint(self, request):
        cid = urlparse(request.url).path.rstrip("/").split("/")[-1]
        coll = self.collections.get(cid)
        if coll is None:
            return _error(404, "EndpointNotFound", f"No such endpoint '{cid}'")
        return 200, JSON, json.dumps({
            "DATA_TYPE": "endpoint", "id": cid, "display_name": coll["name"],
            "entity_type": coll["entity_type"], "high_assurance": coll["high_assurance"],
            "gcs_version": "5.4.80"})

    def _ls(self, request):
        url = urlparse(request.url)
        cid = url.path.split("/")[-2]
        coll = self.collections.get(cid)
        if coll is None:
            return _error(404, "EndpointNotFound", f"No such endpoint '{cid}'")
        if coll["offline"]:
            return _error(502, "ExternalError.DirListingFailed.GCDisconnected",
                          f"The collection '{coll['name']}' is not connected")
        if coll["deny"]:
            return _error(403, "EndpointError.PermissionDenied",
                          "Permission denied")
        path = parse_qs(url.query).get("path", ["/"])[0]
        target = self.path(cid, path)
        if not target.is_dir():
            return _error(404, "ClientError.NotFound", f"Directory '{path}' not found")
        data = [{"DATA_TYPE": "file", "name": p.name,
                 "type": "dir" if p.is_dir() else "file",
                 "size": p.stat().st_size if p.is_file() else 0}
                for p in sorted(target.iterdir())]
        return 200, JSON, json.dumps({"DATA_TYPE": "file_list", "path": path,
                                      "endpoint": cid, "DATA": data})

    def _submit(self, request):
        if self.fail_submits:
            self.fail_submits -= 1
            return _error(502, "ServiceUnavailable", "transient failure")
        doc = json.loads(request.body)
        src, dst = doc["source_endpoint"], doc["destination_endpoint"]
        for cid in (src, dst):
            if cid not in self.collections:
                return _error(404, "EndpointNotFound", f"No such endpoint '{cid}'")
            if self.collections[cid]["consent"]:
                scope = ("urn:globus:auth:scope:transfer.api.globus.org:all"
                         f"[*https://auth.globus.org/scopes/{cid}/data_access]")
                return _error(403, "ConsentRequired",
                              "Missing required data_access consent",
                              required_scopes=[scope],
                              authorization_parameters={"required_scopes": [scope]})
        label = doc.get("label")
        if label is not None and not _LABEL_OK.fullmatch(label):
            return _error(400, "ClientError.BadRequest", f"Invalid label '{label}'")
        if not doc.get("DATA"):
            return _error(400, "ClientError.BadRequest.NoTransferItems",
                          "A transfer requires at least one item")
        sid = doc.get("submission_id")
        if not sid:
            return _error(400, "ClientError.BadRequest", "submission_id is required")
        if sid in self.submissions:  # idempotent resubmit
            tid = self.submissions[sid]
            return 200, JSON, json.dumps({"DATA_TYPE": "transfer_result", "code": "Duplicate",
                                          "task_id": tid, "submission_id": sid})
        tid = str(uuid.uuid4())
        deadline = doc.get("deadline")
        self.tasks[tid] = {
            "task_id": tid, "status": "ACTIVE", "nice_status": "Queued", "label": label,
            "source_endpoint_id": src, "destination_endpoint_id": dst,
            "request_time": _now().isoformat(), "faults": 0, "fatal_error": None,
            "files": len(doc["DATA"]), "files_transferred": 0, "files_skipped": 0,
            "bytes_transferred": 0, "sync_level": doc.get("sync_level"),
            "verify_checksum": doc.get("verify_checksum"),
            "deadline": deadline, "_items": doc["DATA"], "_activated": None,
            "_events": [], "_submitted": time.monotonic(),
        }
        self.submissions[sid] = tid
        self.submitted.append(doc)
        return 202, JSON, json.dumps({
            "DATA_TYPE": "transfer_result", "code": "Accepted", "task_id": tid,
            "submission_id": sid, "request_id": uuid.uuid4().hex[:9],
            "message": "The transfer has been accepted and a task has been created and "
                       "queued for execution"})

    def _public(self, task: dict) -> dict:
        return {k: v for k, v in task.items() if not k.startswith("_")} | {
            "DATA_TYPE": "task", "type": "TRANSFER"}

    def _get_task(self, request):
        tid = urlparse(request.url).path.rstrip("/").split("/")[-1]
        if tid not in self.tasks:
            return _error(404, "TaskNotFound", f"Task '{tid}' not found")
        self._advance()
        return 200, JSON, json.dumps(self._public(self.tasks[tid]))

    def _task_list(self, request):
        q = parse_qs(urlparse(request.url).query)
        clauses = dict(c.split(":", 1) for c in q.get("filter", [""])[0].split("/") if c)
        ids = [x for x in clauses.get("task_id", "").split(",") if x]
        if len(ids) > TASK_LIST_MAX_IDS:
            return _error(400, "ClientError.BadRequest",
                          f"filter task_id accepts at most {TASK_LIST_MAX_IDS} ids")
        limit = int(q.get("limit", ["10"])[0])
        self._advance()
        docs = [self._public(t) for tid, t in self.tasks.items() if not ids or tid in ids]
        return 200, JSON, json.dumps({"DATA_TYPE": "task_list", "DATA": docs[:limit],
                                      "length": len(docs[:limit]), "limit": limit,
                                      "offset": 0, "total": len(docs)})

    def _cancel(self, request):
        tid = urlparse(request.url).path.split("/")[-2]
        task = self.tasks.get(tid)
        if task is None:
            return _error(404, "TaskNotFound", f"Task '{tid}' not found")
        if task["status"] in ("SUCCEEDED", "FAILED"):
            return 200, JSON, json.dumps({"DATA_TYPE": "result", "code": "TaskComplete",
                                          "message": "The task completed before cancel"})
        task.update(status="FAILED", nice_status=None,
                    fatal_error={"code": "CANCELED", "description": "canceled"})
        return 200, JSON, json.dumps({"DATA_TYPE": "result", "code": "Canceled",
                                      "message": "The task has been cancelled successfully."})

    def _event_list(self, request):
        tid = urlparse(request.url).path.split("/")[-2]
        task = self.tasks.get(tid)
        if task is None:
            return _error(404, "TaskNotFound", f"Task '{tid}' not found")
        return 200, JSON, json.dumps({"DATA_TYPE": "event_list",
                                      "DATA": list(reversed(task["_events"])),
                                      "limit": 10, "offset": 0, "total": len(task["_events"])})

    # -- the service's own progress
    def _advance(self) -> None:
        now = time.monotonic()
        active = [t for t in self.tasks.values()
                  if t["status"] == "ACTIVE" and t["_activated"] is not None]
        for task in sorted(self.tasks.values(), key=lambda t: t["_submitted"]):
            if task["status"] != "ACTIVE":
                continue
            if task["_activated"] is None:
                if len(active) >= MAX_ACTIVE:
                    continue  # nice_status stays "Queued"
                task["_activated"] = now
                task["nice_status"] = None
                active.append(task)
            if task["deadline"] and _now() > dt.datetime.fromisoformat(task["deadline"]):
                task.update(status="FAILED", fatal_error={
                    "code": "DEADLINE", "description": "The task deadline was reached"})
                continue
            if now - task["_activated"] < self.setup_s:
                continue
            self._run(task)
            if task["status"] != "ACTIVE":
                active.remove(task)

    def _fault(self, task: dict, code: str, description: str) -> None:
        task["faults"] += 1
        task["nice_status"] = code
        task["_events"].append({"DATA_TYPE": "event", "code": code, "is_error": True,
                                "description": description, "details": description,
                                "time": _now().isoformat()})

    def _run(self, task: dict) -> None:
        src = self.collections[task["source_endpoint_id"]]
        dst = self.collections[task["destination_endpoint_id"]]
        for coll in (src, dst):
            if coll["inactive"]:
                task.update(status="INACTIVE", nice_status="CREDENTIAL_EXPIRED")
                return
            if coll["deny"]:
                task.update(status="FAILED", fatal_error={
                    "code": "PERMISSION_DENIED",
                    "description": f"permission denied on collection '{coll['name']}'"})
                return
            if coll["offline"]:
                self._fault(task, "CONNECT_FAILED", f"collection '{coll['name']}' offline")
                return
        moved = skipped = nbytes = 0
        for item in task["_items"]:
            source = self.path(task["source_endpoint_id"], item["source_path"])
            dest = self.path(task["destination_endpoint_id"], item["destination_path"])
            if not source.is_file():  # globus-cli#1056: retried, stays ACTIVE
                self._fault(task, "FILE_NOT_FOUND",
                            f"No such file or directory: {item['source_path']}")
                return
            data = source.read_bytes()
            if (task["sync_level"] == 3 and dest.is_file()
                    and hashlib.md5(dest.read_bytes()).digest() == hashlib.md5(data).digest()):
                skipped += 1
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            if dest.name in self.corrupt_once:
                self.corrupt_once.discard(dest.name)
                dest.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
                if task["verify_checksum"]:
                    self._fault(task, "VERIFY_CHECKSUM", "checksum mismatch, retrying")
                    return  # retried at the next poll
            else:
                shutil.copyfile(source, dest)
            moved += 1
            nbytes += len(data)
        task.update(status="SUCCEEDED", nice_status=None, files_transferred=moved,
                    files_skipped=skipped, bytes_transferred=nbytes,
                    completion_time=_now().isoformat())


def make_transfer_client():
    """A real ``TransferClient`` with no auth and no retries (the fake answers at once)."""
    import globus_sdk

    tc = globus_sdk.TransferClient(authorizer=globus_sdk.NullAuthorizer())
    tc.retry_config.max_retries = 0
    return tc
