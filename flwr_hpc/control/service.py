"""The HPC SuperLink: a small loopback service speaking Flower's Control API.

It answers the HTTP-protobuf routes that the stock ``flwr`` CLI (>= 1.37) uses, so
``flwr run . hpc``, ``flwr ls hpc``, ``flwr log RUN hpc`` and ``flwr stop RUN hpc`` work
unchanged. Its fleet is the federation's sites, not SuperNodes: each run is a runner
process (``python -m flwr_hpc.server.runner RUN_DIR``) driving an ``HPCGrid``.

Routes: ``POST /v1/control/{start-run,stream-logs,list-runs,stop-run}`` and ``GET /health``.
Also ``list-nodes``, ``list-federations``, ``show-federation`` and ``pull-artifacts``
(:mod:`flwr_hpc.control.fleet`). Every other Control API route answers 501 with Flower's
JSON error saying why it does not apply to an HPC federation.

One cohesive thing (over 400 lines): one HTTP service — its routes, the run processes it
owns, and its lifecycle (lock, adoption of live runners, reaper).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from flwr.common.serde import fab_from_proto, run_to_proto, user_config_from_proto
from flwr.proto.control_pb2 import (  # pylint: disable=E0611
    ListFederationsResponse,
    ListNodesResponse,
    ListRunsRequest,
    ListRunsResponse,
    PullArtifactsRequest,
    PullArtifactsResponse,
    ShowFederationRequest,
    ShowFederationResponse,
    StartRunRequest,
    StartRunResponse,
    StopRunRequest,
    StopRunResponse,
    StreamLogsRequest,
    StreamLogsResponse,
)
from flwr.supercore.error import ApiErrorCode
from flwr.supercore.run import Run, RunStatus
from typing_extensions import override

from flwr_hpc._proc import large_buffer_env
from flwr_hpc.config import FederationConfig, read_federation
from flwr_hpc.control import fleet
from flwr_hpc.control.access import FAILED_TO_CREATE_RUN, RUN_ID_NOT_FOUND, check_request
from flwr_hpc.errors import FlwrHpcError
from flwr_hpc.locks import ExclusiveLock, holder_state
from flwr_hpc.payload.objects import sha256_hex
from flwr_hpc.server.runs import (
    check_resumable,
    now_iso,
    prepare_run,
    read_status,
    runner_holder,
    runner_holding,
    runs_dir,
    update_status,
)

log = logging.getLogger("flwr_hpc.control.service")

PROTOBUF = "application/protobuf"
PROTOBUF_STREAM = "application/flower-protobuf-stream"
STOP_GRACE_S = 15.0


def run_from_status(status: dict[str, Any], run_dir: Path) -> Run:
    """The Flower ``Run`` that ``flwr ls`` shows for a run's ``status.json``, with bytes
    sent and received summed from the run's ``tasks.jsonl``.
    """
    run = Run.create_empty(int(status["run_id"]))
    run.fab_id = status.get("fab_id", "")
    run.fab_version = status.get("fab_version", "")
    run.fab_hash = status.get("fab_hash", "")
    run.override_config = status.get("override_config", {})
    run.pending_at = status.get("pending_at", "")
    run.starting_at = status.get("starting_at", "")
    run.running_at = status.get("running_at", "")
    run.finished_at = status.get("finished_at", "")
    run.status = RunStatus(status.get("status", "pending"), status.get("sub_status", ""),
                           status.get("details", ""))
    run.federation_id = status.get("federation", "")
    sent = recv = 0
    tasks = run_dir / "tasks.jsonl"
    if tasks.exists():
        for line in tasks.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            sent += int(rec.get("bytes_to_site") or 0)
            recv += int(rec.get("bytes_from_site") or 0)
    run.bytes_sent, run.bytes_recv = sent, recv
    return run


class HPCSuperLink:
    """Run registry + process management behind the HTTP handler."""

    def __init__(self, federation: FederationConfig, home: Path) -> None:
        self.federation = federation
        self.home = home
        self.started_at = now_iso()
        self.runs_dir = runs_dir(home)
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        self._procs: dict[int, subprocess.Popen] = {}
        self._warned: set[str] = set()
        # final statuses that could not be written yet (disk full): served from memory
        # and written as soon as the disk takes them
        self._unwritten: dict[int, dict[str, Any]] = {}
        # runs whose runner this service did not start (found alive at start-up): pid
        self._adopted: dict[int, int] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._reaper = threading.Thread(target=self._reap_loop, daemon=True)
        self._reaper.start()
        self._resume_orphans()

    # -- runs ------------------------------------------------------------------

    def _run_dirs(self) -> list[Path]:
        """The run directories under ``runs/``; anything else there is skipped (warned once)."""
        out = []
        for path in sorted(self.runs_dir.iterdir()):
            if path.is_dir() and path.name.isdigit() and read_status(path).get("run_id"):
                out.append(path)
            elif path.name not in self._warned:
                self._warned.add(path.name)
                log.warning("skipping %s: not a run directory", path)
        return out

    def _resume_orphans(self) -> None:
        """Runs a previous service left unfinished (it or its host died):
        - one whose runner still holds the run's lock is *adopted*: watched, and stopped
          by ``flwr stop`` like the runs this service started;
        - one a service started (``origin: service``, or no origin: older run directories)
          is resumed from its last checkpoint (it loses at most the round in progress);
        - a foreground ``flwr-hpc run`` that was killed is not resumed behind the user's
          back: it is marked failed, and stays resumable with ``flwr-hpc resume``.
        """
        for run_dir in self._run_dirs():
            status = read_status(run_dir)
            if not status or status.get("status") == "finished":
                continue
            run_id = int(run_dir.name)
            holder = runner_holder(run_dir)
            if holder is not None and holder_state(holder) == "elsewhere":
                # $HOME is shared by the login nodes: that runner is someone's on another
                # node; neither adopted (its pid means nothing here) nor resumed
                log.warning("run %s is executed by its runner %s: left alone (stop or "
                            "resume it from that node)", run_id, holder.describe())
                continue
            if holder is not None:
                with self._lock:
                    self._adopted[run_id] = holder.pid
                log.info("adopted run %s (its runner, pid %s, is still running)",
                         run_id, holder.pid or "?")
                continue
            self._recover(run_dir, "the HPC SuperLink stopped while this run was active")

    def _recover(self, run_dir: Path, what: str) -> None:
        """An unfinished run without a runner: resume a service-started one, mark a
        foreground one failed (resumable on request).
        """
        run_id = int(run_dir.name)
        if read_status(run_dir).get("origin") == "foreground":
            log.warning("run %s was a foreground run that ended without finishing; "
                        "resume it with `flwr-hpc resume %s`", run_id, run_id)
            self._finish(run_id, status="finished", sub_status="failed",
                         details="its foreground runner ended without finishing "
                         f"(killed?); resume it with `flwr-hpc resume {run_id}`",
                         finished_at=now_iso())
            return
        try:
            self.resume_run(run_id)
        except Exception as err:  # noqa: BLE001 - never keep the service from starting
            log.error("could not resume run %s: %s", run_id, err)
            self._finish(run_id, status="finished", sub_status="failed",
                         details=f"{what} and it could not be resumed: {err}",
                         finished_at=now_iso())

    def _spawn(self, run_dir: Path) -> int:
        run_id = int(run_dir.name)
        out = open(run_dir / "runner.out", "ab")
        proc = subprocess.Popen(
            [sys.executable, "-m", "flwr_hpc.server.runner", str(run_dir)],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,  # its own process group: stop kills the whole tree
            env=large_buffer_env(),  # reuse payload buffers (see flwr_hpc._proc)
        )
        out.close()
        with self._lock:
            self._procs[run_id] = proc  # the runner records its own pid (and holds the lock)
        return proc.pid

    def start_run(self, fab_bytes: bytes, fab_hash: str, override: dict[str, Any]) -> int:
        """Prepare a new run of the FAB (checked against ``fab_hash`` when one is sent)
        with the run config ``override``, start its runner process, and return its id.
        """
        if fab_hash and sha256_hex(fab_bytes) != fab_hash:
            raise ValueError("FAB bytes do not match the FAB hash sent with them")
        run_dir = prepare_run(fab_bytes, override, self.federation, home=self.home)
        pid = self._spawn(run_dir)
        log.info("started run %s (pid %s)", run_dir.name, pid)
        return int(run_dir.name)

    def resume_run(self, run_id: int) -> int:
        """Start the runner again on an interrupted run; return its checkpointed round."""
        run_dir = self.runs_dir / str(run_id)
        with self._lock:
            proc = self._procs.get(run_id)
        if proc is not None and proc.poll() is None:
            raise FlwrHpcError(f"run {run_id} is still running")
        done = check_resumable(run_dir)  # refuses while any runner holds the run's lock
        update_status(run_dir, status="pending", sub_status="", details="",
                      pending_at=now_iso(), finished_at="")
        pid = self._spawn(run_dir)
        log.info("resumed run %s after round %d (pid %s)", run_id, done, pid)
        return done

    def run_dir(self, run_id: int) -> Path | None:
        """The run's directory, or None if there is no run with a status file there."""
        path = self.runs_dir / str(run_id)
        return path if (path / "status.json").exists() else None

    def status_of(self, run_dir: Path) -> dict[str, Any]:
        """The run's status: its file, or the final status not written yet (disk full)."""
        status = read_status(run_dir)
        with self._lock:
            pending = self._unwritten.get(int(run_dir.name)) if run_dir.name.isdigit() else None
        return {**status, **pending} if pending else status

    def list_runs(self, run_id: int | None = None) -> dict[int, Run]:
        """Every run (or only ``run_id``) as a Flower ``Run``, by run id; run directories
        whose status cannot be read are skipped.
        """
        out: dict[int, Run] = {}
        dirs = [self.run_dir(run_id)] if run_id is not None else self._run_dirs()
        for d in dirs:
            if d is None:
                continue
            status = self.status_of(d)
            try:
                out[int(status["run_id"])] = run_from_status(status, d)
            except (KeyError, TypeError, ValueError) as err:
                log.warning("skipping run directory %s: unreadable status (%s)", d, err)
        return out

    def _finish(self, run_id: int, **fields: Any) -> None:
        """Record a run's final status; if the disk refuses it, keep it in memory (served
        to the CLI) and retry from the reaper loop.
        """
        run_dir = self.runs_dir / str(run_id)
        try:
            update_status(run_dir, **fields)
        except OSError as err:
            log.error("could not write the final status of run %s (%s); serving it from "
                      "memory and retrying", run_id, err)
            with self._lock:
                self._unwritten[run_id] = fields
            return
        with self._lock:
            self._unwritten.pop(run_id, None)

    def stop_run(self, run_id: int) -> bool:
        """Stop the run's runner (and its site workers) and mark the run finished:stopped.
        False when there is no such run, it has finished already, or its runner did not
        stop.
        """
        run_dir = self.run_dir(run_id)
        if run_dir is None:
            return False
        if read_status(run_dir).get("status") == "finished":
            return False
        with self._lock:
            proc = self._procs.get(run_id)
        if proc is not None:
            _terminate_group(proc, STOP_GRACE_S)
        holder = runner_holder(run_dir)
        if holder is not None and holder_state(holder) == "elsewhere":
            log.error("run %s: its runner is %s; stop it from that node", run_id,
                      holder.describe())
            return False
        if holder is not None:  # an adopted runner (or one started around this service)
            if not holder.pid or not _terminate_runner(holder.pid, run_dir, STOP_GRACE_S):
                log.error("run %s: its runner (pid %s) did not stop", run_id,
                          holder.pid or "?")
                return False
        if read_status(run_dir).get("status") != "finished":
            update_status(run_dir, status="finished", sub_status="stopped",
                          details="stopped by request", finished_at=now_iso())
        return True

    def _reap_loop(self) -> None:
        """Notice runners that ended, record their runs as finished. Survives any error
        (a full disk, a vanished run directory): one failed pass is retried the next.
        """
        while not self._stopping.wait(1.0):
            try:
                self._reap_once()
            except Exception:  # noqa: BLE001 - this loop must outlive any one failure
                log.exception("reaper pass failed; retrying")

    def _reap_once(self) -> None:
        with self._lock:
            items = list(self._procs.items())
            unwritten = dict(self._unwritten)
            adopted = list(self._adopted)
        for run_id in adopted:  # a runner a previous service started: ended yet?
            run_dir = self.runs_dir / str(run_id)
            if runner_holding(run_dir) is not None:
                continue
            with self._lock:
                self._adopted.pop(run_id, None)
            if read_status(run_dir).get("status") != "finished":
                self._recover(run_dir, "its runner ended without recording an outcome")
        for run_id, fields in unwritten.items():
            self._finish(run_id, **fields)
        for run_id, proc in items:
            code = proc.poll()
            if code is None:
                continue
            run_dir = self.run_dir(run_id)
            holder = runner_holding(run_dir) if run_dir else None
            if holder is not None:  # it found another runner on the run: watch that one
                with self._lock:
                    self._adopted[run_id] = holder
            elif run_dir and read_status(run_dir).get("status") != "finished":
                self._finish(run_id, status="finished", sub_status="failed",
                             details=f"runner exited with code {code}",
                             finished_at=now_iso())
            with self._lock:
                self._procs.pop(run_id, None)

    def shutdown(self) -> None:
        """Stop the reaper and every runner (adopted ones included), marking their runs
        finished:stopped.
        """
        self._stopping.set()
        with self._lock:
            procs = list(self._procs.items())
            adopted = list(self._adopted.items())
        for run_id, pid in adopted:  # runs adopted from a previous service stop too
            run_dir = self.runs_dir / str(run_id)
            if pid and _terminate_runner(pid, run_dir, STOP_GRACE_S) and read_status(
                    run_dir).get("status") != "finished":
                self._finish(run_id, status="finished", sub_status="stopped",
                             details="the HPC SuperLink was shut down", finished_at=now_iso())
        for run_id, proc in procs:
            log.info("stopping run %s", run_id)
            _terminate_group(proc, STOP_GRACE_S)
            run_dir = self.run_dir(run_id)
            if run_dir and read_status(run_dir).get("status") != "finished":
                update_status(run_dir, status="finished", sub_status="stopped",
                              details="the HPC SuperLink was shut down", finished_at=now_iso())


def _terminate_runner(pid: int, run_dir: Path, grace_s: float) -> bool:
    """Stop a runner this service did not start (no Popen): SIGTERM, then SIGKILL after
    ``grace_s``; its whole process group when it leads one (the service's runners do),
    else the runner alone (a foreground ``flwr-hpc run`` shares its shell's group; its site
    workers follow it). True once the run's lock is free.
    """
    def signal_it(sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if os.getpgid(pid) == pid:
                os.killpg(pid, sig)
            else:
                os.kill(pid, sig)

    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
        signal_it(sig)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if runner_holding(run_dir) is None:
                return True
            time.sleep(0.2)
    return runner_holding(run_dir) is None


def _terminate_group(proc: subprocess.Popen, grace_s: float) -> None:
    """SIGTERM the process group (runner + its site workers), SIGKILL after ``grace_s``."""
    try:
        pgid = os.getpgid(proc.pid)
    except ProcessLookupError:
        return
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(pgid, signal.SIGKILL)  # whatever the runner did not clean up
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


def make_handler(link: HPCSuperLink) -> type[BaseHTTPRequestHandler]:
    """The HTTP request handler class that serves ``link``'s routes."""
    class Handler(BaseHTTPRequestHandler):
        server_version = "flwr-hpc"
        timeout = IDLE_TIMEOUT_S  # an idle connection (no request, or a stalled body) ends

        def log_message(self, fmt: str, *args: Any) -> None:  # route to logging
            log.debug("%s " + fmt, self.address_string(), *args)

        def _body(self) -> bytes:
            length = int(self.headers.get("content-length") or 0)
            return self.rfile.read(length) if length else b""

        def _reply(self, status: int, body: bytes, ctype: str = PROTOBUF) -> None:
            self.send_response(status)
            self.send_header("content-type", ctype)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _fail(self, status: int, text: str, code: int = 0) -> None:
            """An error in Flower's format (JSON code + detail), which the CLI prints."""
            self._reply(status, json.dumps({"code": code, "detail": text}).encode(),
                        "application/json")

        def _refused(self, method: str) -> bool:
            """Refuse anyone but the owner, browsers, wrong content types and oversized
            bodies before reading the body (see flwr_hpc.control.access).
            """
            refusal = check_request(method=method, route=self.path.rstrip("/"),
                                    headers=self.headers, peer=self.client_address,
                                    local=self.server.server_address[:2])
            if refusal is None:
                return False
            log.warning("refused %s %s from %s: %s", method, self.path,
                        self.client_address, refusal.detail)
            self.close_connection = True
            self._fail(refusal.http_status, refusal.detail, refusal.code)
            return True

        def do_GET(self) -> None:  # noqa: N802
            if self._refused("GET"):
                return
            if self.path == "/health":
                self._reply(200, json.dumps({
                    "status": "ok", "federation": link.federation.name,
                    "pid": os.getpid(), "home": str(link.home)}).encode(), "application/json")
            else:
                self._fail(404, f"{self.path} not found: the HPC SuperLink serves GET /health and "
                                "Flower's Control API (POST /v1/control/...)")

        def do_POST(self) -> None:  # noqa: N802
            if self._refused("POST"):
                return
            route = self.path.rstrip("/")
            try:
                if route == "/hpc/resume-run":  # flwr-hpc resume (not a Flower RPC)
                    run_id = int(json.loads(self._body() or b"{}")["run_id"])
                    try:
                        done = link.resume_run(run_id)
                    except FlwrHpcError as err:
                        self._fail(409, str(err))
                        return
                    self._reply(200, json.dumps({"run_id": run_id, "after_round": done}
                                                ).encode(), "application/json")
                elif route == "/v1/control/start-run":
                    req = StartRunRequest.FromString(self._body())
                    if not req.fab.content:
                        self._fail(400, "flwr-hpc runs only local apps: the request has no FAB",
                                   FAILED_TO_CREATE_RUN)
                        return
                    if req.HasField("override_federation_config"):
                        self._fail(400, "flwr-hpc: run not started: --federation-config "
                                   "sets a simulation (num-supernodes, backend); an HPC "
                                   "federation's nodes are its sites' client slots from the "
                                   "federation config (conf/federation/*.yaml) chosen by "
                                   "`flwr-hpc up federation=<name>`", FAILED_TO_CREATE_RUN)
                        return
                    fab = fab_from_proto(req.fab)
                    try:
                        run_id = link.start_run(fab.content, fab.hash_str,
                                                user_config_from_proto(req.override_config))
                    except (FlwrHpcError, ValueError) as err:  # a bad FAB: nothing written
                        self._fail(400, f"flwr-hpc: run not started: {err}",
                                   FAILED_TO_CREATE_RUN)
                        return
                    self._reply(200, StartRunResponse(run_id=run_id).SerializeToString())
                elif route == "/v1/control/list-runs":
                    req = ListRunsRequest.FromString(self._body())
                    runs = link.list_runs(req.run_id if req.HasField("run_id") else None)
                    res = ListRunsResponse(
                        run_dict={rid: run_to_proto(r) for rid, r in runs.items()},
                        now=now_iso())
                    self._reply(200, res.SerializeToString())
                elif route == "/v1/control/stop-run":
                    req = StopRunRequest.FromString(self._body())
                    ok = link.stop_run(req.run_id)
                    self._reply(200, StopRunResponse(success=ok).SerializeToString())
                elif route == "/v1/control/stream-logs":
                    self._stream_logs(StreamLogsRequest.FromString(self._body()))
                elif route == "/v1/control/list-nodes":
                    self._reply(200, ListNodesResponse(
                        nodes_info=fleet.nodes_info(link.federation, link.started_at),
                        now=now_iso()).SerializeToString())
                elif route == "/v1/control/list-federations":
                    self._reply(200, ListFederationsResponse(federations=[
                        fleet.federation_proto(link.federation, link.started_at)]
                    ).SerializeToString())
                elif route == "/v1/control/show-federation":
                    self._show_federation(ShowFederationRequest.FromString(self._body()))
                elif route == "/v1/control/pull-artifacts":
                    self._pull_artifacts(PullArtifactsRequest.FromString(self._body()))
                else:
                    code, detail = fleet.unsupported(route)
                    self._fail(501, detail, code)
            except Exception as err:  # noqa: BLE001 - report to the CLI instead of hanging up
                log.exception("request %s failed", route)
                self._fail(500, f"{type(err).__name__}: {err}")

        def _show_federation(self, req: ShowFederationRequest) -> None:
            name = link.federation.name
            if req.federation_name not in ("", name):
                self._fail(404, f"federation '{req.federation_name}' is not served here: "
                                f"this HPC SuperLink serves federation '{name}'",
                           ApiErrorCode.FEDERATION_NOT_FOUND)
                return
            runs = [run_to_proto(r) for r in link.list_runs().values()]
            self._reply(200, ShowFederationResponse(
                federation=fleet.federation_proto(link.federation, link.started_at,
                                                  with_nodes=True, runs=runs),
                now=now_iso()).SerializeToString())

        def _pull_artifacts(self, req: PullArtifactsRequest) -> None:
            run_dir = link.run_dir(req.run_id)
            if run_dir is None:
                self._fail(404, f"run {req.run_id} not found", RUN_ID_NOT_FOUND)
                return
            if link.status_of(run_dir).get("status") != "finished":
                self._fail(409, f"run {req.run_id} has not finished; pull its artifacts "
                                "when it has (flwr ls shows its status)",
                           ApiErrorCode.PULL_UNFINISHED_RUN)
                return
            path = fleet.pack_artifacts(run_dir)
            self._reply(200, PullArtifactsResponse(url=path.as_uri()).SerializeToString())

        def _stream_logs(self, req: StreamLogsRequest) -> None:
            run_dir = link.run_dir(req.run_id)
            if run_dir is None:
                self._fail(404, f"run {req.run_id} not found", RUN_ID_NOT_FOUND)
                return
            self.send_response(200)
            self.send_header("content-type", PROTOBUF_STREAM)
            self.end_headers()  # no content-length: the stream ends when we close
            log_path = run_dir / "log.txt"
            offset = 0
            while True:
                finished = link.status_of(run_dir).get("status") == "finished"
                chunk = b""
                if log_path.exists():
                    with open(log_path, "rb") as fh:
                        fh.seek(offset)
                        chunk = fh.read()
                if chunk:
                    # only whole lines, so a frame never splits a UTF-8 character
                    cut = chunk.rfind(b"\n") + 1 if not finished else len(chunk)
                    chunk = chunk[:cut]
                if chunk:
                    offset += len(chunk)
                    frame = StreamLogsResponse(log_output=chunk.decode(errors="replace"),
                                               latest_timestamp=time.time()).SerializeToString()
                    try:
                        self.wfile.write(len(frame).to_bytes(4, "big") + frame)
                        self.wfile.flush()
                    except (BrokenPipeError, ConnectionResetError, TimeoutError):
                        return
                elif finished:
                    return
                else:
                    time.sleep(0.25)

    return Handler


SERVICE_LOCK = "service.lock"
# Connections served at once (each holds a thread and a descriptor; log streams are
# long-lived) and how long an idle one may wait: a flood of idle connections cannot use up
# the service's file descriptors.
MAX_CONNECTIONS = 128
IDLE_TIMEOUT_S = 5.0


class BoundedHTTPServer(ThreadingHTTPServer):
    """A threading HTTP server that serves at most :data:`MAX_CONNECTIONS` connections at
    once (the next ones are closed at once) and closes idle ones (the handler's timeout).
    """

    daemon_threads = True
    request_queue_size = 128  # the listen backlog (socketserver's default of 5 drops
    # connections in a burst, and clients wait a second per retry)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)

    @override
    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            log.warning("refusing a connection from %s: %d connections open already",
                        client_address, MAX_CONNECTIONS)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    @override
    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


def serve(federation: FederationConfig, home: Path, host: str, port: int) -> None:
    """Serve until SIGTERM/SIGINT. The port is bound and ``$FLWR_HOME/hpc/service.lock``
    taken *before* any run is resumed or adopted: of two services started at once on one
    FLWR_HOME, the second exits without touching a run.
    """
    server = BoundedHTTPServer((host, port), None)  # bind first: a taken port ends here
    hpc = home / "hpc"
    hpc.mkdir(parents=True, exist_ok=True)
    lock = ExclusiveLock(hpc / SERVICE_LOCK)  # held until this process ends
    if not lock.acquire(timeout=0):
        server.server_close()
        holder = lock.holder()
        raise SystemExit(f"another HPC SuperLink ({holder.describe() if holder else '?'}) "
                         f"serves FLWR_HOME {home}; not starting a second one")
    link = HPCSuperLink(federation, home)
    server.RequestHandlerClass = make_handler(link)

    def _stop(signum: int, frame: Any) -> None:
        threading.Thread(target=lambda: (link.shutdown(), server.shutdown()), daemon=True).start()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    log.info("HPC SuperLink for federation '%s' listening on %s:%s", federation.name, host, port)
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()
        lock.release()
        log.info("HPC SuperLink stopped")


def main(argv: list[str] | None = None) -> int:
    """``python -m flwr_hpc.control.service``: serve the federation read from
    ``--federation-json`` on ``--host:--port`` (what ``flwr-hpc up`` starts).
    """
    parser = argparse.ArgumentParser(prog="python -m flwr_hpc.control.service")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--federation-json", type=Path, required=True)
    parser.add_argument("--home", type=Path, required=True)
    args = parser.parse_args(argv)
    os.umask(0o077)  # runs, FABs and stores it creates are its owner's only
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    serve(read_federation(args.federation_json), args.home, args.host, args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
