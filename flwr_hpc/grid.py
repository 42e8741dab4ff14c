"""``HPCGrid``: a Flower ``Grid`` whose nodes are client slots at HPC sites.

Every message a strategy sends becomes one site-worker task. For each phase the grid:

1. sets the message metadata the way Flower's own grids do (``message_id`` = object id,
   ``run_id``, ``src_node_id`` = 1);
2. *stages* the payloads: the union of the phase's objects per site, written once per site
   (the global model crosses to a site once per round, however many clients it hosts;
   objects the site already holds are skipped), plus each node's ``Context`` and the FAB;
3. submits all tasks of the phase at once, then collects replies until all are in or the
   deadline passes. A task that fails becomes a Flower ``Error`` reply; a task that misses
   the deadline is dropped from the round and its late result discarded.

``send_and_receive`` returns a ``list``, as Flower's own grids do (Flower's workflows
iterate the replies twice and take ``len()``), and any number of threads may call it at
once (Flower's legacy ``Server`` sends one message per client from a thread pool): each
call waits on its own queue and gets exactly its replies. Streaming -- replies yielded
one at a time so a strategy holds one reply, not all of them -- is the explicit opt-in
:meth:`HPCGrid.stream_replies` (see :class:`StreamingGrid`).

Per-node ``Context`` objects live here, so ``context.state`` persists across rounds as it
does on a SuperNode: a node's Context is updated when its ClientApp finishes, whether or
not the ServerApp ever pulls the reply, and a message to a node that is still running an
earlier one waits for it (one message at a time per node, as on a SuperNode), so it is
staged with the Context that message left behind.
"""

from __future__ import annotations

import base64
import logging
import os
import queue
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.proto.node_pb2 import NodeInfo  # pylint: disable=E0611
from flwr.serverapp import Grid
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.run import Run

from flwr_hpc.compute import ComputeBackend, make_backend
from flwr_hpc.config import SUPERLINK_NODE_ID, ClientSlot, FederationConfig
from flwr_hpc.errors import FlwrHpcError, RemoteTaskError, WorkerLostError
from flwr_hpc.payload.inline import InlineStore
from flwr_hpc.payload.objects import (
    Parts,
    fast_object_ids,
    inflate_message,
    object_parts,
    sha256_hex,
)
from flwr_hpc.payload.store import FilesystemStore, PayloadStore
from flwr_hpc.protocol import JOB_VERSION, context_from_bytes, context_to_bytes
from flwr_hpc.telemetry import Progress, TaskLog
from flwr_hpc.timing import SiteTimings, TaskTiming, WallClock, local_steps_of
from flwr_hpc.worker import run_task

log = logging.getLogger("flwr_hpc")

_ERROR_NAMES = {
    getattr(ErrorCode, n): n for n in dir(ErrorCode) if n.isupper()
}


def _error_outcome(code: int) -> str:
    """The ``tasks.jsonl`` outcome of an error reply, e.g. ``error:NODE_UNAVAILABLE``."""
    return f"error:{_ERROR_NAMES.get(code, code)}"


def _r6(value: float | None) -> float | None:
    return None if value is None else round(value, 6)


def round_of(message: Message) -> str:
    """The round a message belongs to: its group id, else the ``server-round`` it carries."""
    if message.metadata.group_id:
        return message.metadata.group_id
    if not message.has_error():
        for record in message.content.config_records.values():
            if "server-round" in record:
                return str(record["server-round"])
    return ""


@dataclass
class Task:
    message: Message
    message_id: str
    node: ClientSlot
    submitted_at: float = 0.0
    stage_s: float = 0.0
    bytes_to_site: int = 0
    future: Future | None = None
    immediate: Message | None = None  # reply known without running (e.g. unknown node)
    abandoned: bool = False
    context_id: str = ""
    object_ids: list[str] = field(default_factory=list)  # what an inline task carries
    fetch_error: str = ""  # the site's reply transfer failed (Transfer stores)
    done_at: float | None = None  # server clock when the result was known
    steps: int | None = None  # local steps the message asks for (timing signals)
    parts: dict[str, Parts] | None = None  # held while it waits for its node (backlog)

    @property
    def phase(self) -> str:
        return self.message.metadata.message_type

    @property
    def round(self) -> str:
        return round_of(self.message)


@dataclass
class SiteRuntime:
    """What the grid holds for one site: its backend, its store, its apps dir."""

    backend: ComputeBackend
    store: PayloadStore
    apps_dir: Path
    job_extras: dict[str, Any] = field(default_factory=dict)  # launcher, thread share


def local_thread_share(federation: FederationConfig) -> int:
    """CPU threads per rank when all local sites' workers share this machine's cores."""
    if federation.is_simulated():  # one shared pool runs every simulated site's tasks
        ranks = federation.sites[0].compute["workers"]
    else:
        ranks = sum(s.compute["workers"] * s.launcher["ranks"] for s in federation.sites
                    if s.compute["type"] == "local")
    return max(1, (os.cpu_count() or 1) // max(ranks, 1))


def open_site_store(federation: FederationConfig, site: str, flwr_home: Path) -> PayloadStore:
    """The server's handle on ``site``'s payload store, from the site's ``payload`` config."""
    payload = federation.site(site).payload
    transfer = None
    if payload["collection_id"]:  # globus-transfer, or an inline site's file replies
        from flwr_hpc.payload.transfer import GlobusTransferStore, TransferSettings

        transfer = GlobusTransferStore(
            site, collection_id=payload["collection_id"],
            collection_path=payload["collection_path"], site_path=payload["path"],
            settings=TransferSettings.from_config(federation.transfer))
    if payload["type"] == "inline":
        reply_store = transfer or (FilesystemStore(payload["path"], site=site,
                                                   fsync=payload["fsync"])
                                   if payload["path"] else None)
        return InlineStore(site, max_task_bytes=payload["max_task_bytes"],
                           max_result_bytes=payload["max_result_bytes"],
                           reply_path=payload["path"], reply_store=reply_store)
    if transfer is not None:
        return transfer
    root = site_root(federation, site, flwr_home)
    return FilesystemStore(Path(payload["path"]) if payload.get("path") else root / "store",
                           site=site, fsync=payload["fsync"])


def site_root(federation: FederationConfig, site: str, flwr_home: Path) -> Path:
    base = Path(federation.workdir) if federation.workdir else flwr_home / "hpc" / "sites"
    if not federation.workdir:
        base = base / federation.name
    return base / site


class HPCGrid(Grid):
    """Flower ``Grid`` over the sites of a federation.

    Parameters
    ----------
    federation : FederationConfig
        The validated federation.
    sites : dict[str, SiteRuntime]
        Backend, store and apps dir of every site (see :meth:`from_federation`).
    fab_bytes : bytes
        The run's FAB; staged to each site once and installed there by hash.
    run_config : dict
        The fused run config given to every node's ``Context``.
    task_log : TaskLog, optional
        Receives one record per task (``tasks.jsonl``).
    progress : Progress, optional
        Receives phase/task events.
    worker_fn : callable, optional
        The site-worker entry point; a module-level function of an installed package.
    """

    def __init__(
        self,
        federation: FederationConfig,
        sites: dict[str, SiteRuntime],
        fab_bytes: bytes,
        run_config: dict[str, Any] | None = None,
        task_log: TaskLog | None = None,
        progress: Progress | None = None,
        worker_fn: Callable[[dict], dict] = run_task,
    ) -> None:
        self.federation = federation
        self.sites = sites
        self._fab_bytes = fab_bytes
        self.fab_hash = sha256_hex(fab_bytes)
        self._run_config = dict(run_config or {})
        self.task_log = task_log or TaskLog(None)
        self.progress = progress or Progress()
        self._worker_fn = worker_fn
        self._run: Run | None = None
        self._nodes = {c.node_id: c for c in federation.clients()}
        self._contexts: dict[int, Context] = {}
        self._tasks: dict[str, Task] = {}
        # message id -> the queue of the receive call waiting for it (one per call)
        self._waiters: dict[str, queue.Queue[str]] = {}
        # node id -> message id of the task it runs now; later messages wait in its backlog
        self._busy: dict[int, str] = {}
        self._backlog: dict[int, deque[Task]] = defaultdict(deque)
        self._lock = threading.RLock()
        self._closed = False
        self._interrupted = threading.Event()  # the run is stopping: every wait ends
        self._cond = threading.Condition()  # notified whenever a task's result is known
        self.clock = WallClock()  # the server's clock; every timing signal is read on it
        self.timings = SiteTimings()  # per-site history for scheduler-aware strategies
        # one staging thread per site: a Transfer store waits seconds on its transfer task
        self._stage_pool = ThreadPoolExecutor(max_workers=max(4, len(sites)),
                                              thread_name_prefix="flwr-hpc-stage")

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_federation(
        cls,
        federation: FederationConfig,
        fab_bytes: bytes,
        *,
        run_dir: Path,
        flwr_home: Path,
        run_config: dict[str, Any] | None = None,
        progress: Progress | None = None,
        backends: dict[str, ComputeBackend] | None = None,
    ) -> HPCGrid:
        """Build backends (unless given) and stores for every site and return a ready
        grid. :func:`flwr_hpc.wiring.make_grid` picks the grid class for a federation."""
        sites: dict[str, SiteRuntime] = {}
        threads = local_thread_share(federation)
        try:
            for s in federation.sites:
                root = site_root(federation, s.name, flwr_home)
                store = open_site_store(federation, s.name, flwr_home)
                backend = (backends[s.name] if backends is not None
                           else make_backend(s, run_dir / "sites" / s.name))
                extras: dict[str, Any] = {"launcher": dict(s.launcher)}
                if s.compute["type"] in ("local", "sim"):
                    extras["threads"] = threads
                sites[s.name] = SiteRuntime(backend=backend, store=store, apps_dir=root / "apps",
                                            job_extras=extras)
        except BaseException:
            for rt in sites.values():
                rt.backend.close()
            for backend in (backends or {}).values():
                backend.close()
            raise
        return cls(federation, sites, fab_bytes, run_config=run_config,
                   task_log=TaskLog(run_dir / "tasks.jsonl"), progress=progress)

    # ------------------------------------------------------------------ Grid API

    def set_run(self, run: Run) -> None:
        if not isinstance(run, Run):
            raise TypeError(f"`run` must be an instance of Run, got {type(run).__name__}")
        self._run = run

    @property
    def run(self) -> Run:
        if self._run is None:
            raise RuntimeError("HPCGrid.set_run() has not been called")
        return Run(**vars(self._run))

    def create_message(  # noqa: PLR0913 - Flower's signature
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self._nodes)

    def get_nodes(self) -> Iterable[NodeInfo]:
        return [NodeInfo(node_id=nid, name=f"{c.site}/{c.slot}", location=c.site)
                for nid, c in self._nodes.items()]

    def site_of(self, node_id: int) -> str:
        """The site that hosts ``node_id``."""
        node = self._nodes.get(node_id)
        if node is None:
            raise KeyError(f"node {node_id} is not part of federation "
                           f"'{self.federation.name}'")
        return node.site

    def wait_any(self, message_ids: Iterable[str], until: float | None = None) -> list[str]:
        """Block until at least one of ``message_ids`` has a reply ready for
        :meth:`pull_messages`, or until the grid clock reaches ``until``; return the ids
        ready now (``[]`` at ``until`` or when none of them is in flight). The non-blocking
        ``push_messages`` / ``wait_any`` / ``pull_messages`` trio is what asynchronous
        strategies use to keep sites busy across rounds."""
        ids = list(message_ids)
        with self._cond:
            while True:
                live = {m: t for m in ids
                        if (t := self._tasks.get(m)) is not None and not t.abandoned}
                ready = [m for m, t in live.items() if self._is_ready(t)]
                if ready or not live or self._interrupted.is_set() or self._closed:
                    return ready
                wait = None if until is None else until - self.clock.now()
                if wait is not None and wait <= 0:
                    return []
                self._cond.wait(timeout=1.0 if wait is None else min(wait, 1.0))

    @staticmethod
    def _is_ready(task: Task) -> bool:
        return task.immediate is not None or (task.future is not None and task.future.done())

    def _mark_done(self, message_id: str) -> None:
        task = self._tasks.get(message_id)
        if task is not None and task.done_at is None:
            task.done_at = self.clock.now()
        with self._lock:
            waiter = self._waiters.get(message_id)
        if waiter is not None:
            waiter.put(message_id)
        with self._cond:
            self._cond.notify_all()
        if task is not None:
            self._release_node(task)

    def _release_node(self, task: Task) -> None:
        """``task`` no longer occupies its node: start the node's next waiting message."""
        nid = task.node.node_id
        nxt: Task | None = None
        with self._lock:
            if self._busy.get(nid) != task.message_id:
                return
            del self._busy[nid]
            backlog = self._backlog.get(nid)
            while backlog:
                candidate = backlog.popleft()
                if candidate.abandoned:  # its deadline passed while it waited
                    self._tasks.pop(candidate.message_id, None)
                    continue
                nxt = candidate
                self._busy[nid] = nxt.message_id
                break
            if not backlog:
                self._backlog.pop(nid, None)
        if nxt is not None and not self._closed:
            self._stage_pool.submit(self._stage_and_submit, nxt)

    def _stage_and_submit(self, task: Task) -> None:
        """Stage and submit one message that waited for its node (with the Context its
        node's previous message left)."""
        parts, task.parts = task.parts or {}, None
        try:
            self._stage_site(task.node.site, [task], parts)
        except Exception as err:  # noqa: BLE001 - that node gets an error reply
            log.error("staging to site '%s' failed: %s", task.node.site, err)
            task.immediate = Message(
                Error(ErrorCode.MESSAGE_UNAVAILABLE,
                      f"staging to site '{task.node.site}' failed: {err}"),
                reply_to=task.message)
            self._mark_done(task.message_id)
            return
        self._submit(task)

    def node_context(self, node_id: int) -> Context:
        """The node's current ``Context`` (what its ClientApp will receive next)."""
        ctx = self._contexts.get(node_id)
        if ctx is None:
            node = self._nodes[node_id]
            ctx = Context(
                run_id=self.run.run_id, node_id=node_id, node_config=dict(node.node_config),
                state=RecordDict(), run_config=dict(self._run_config),
            )
            self._contexts[node_id] = ctx
        return ctx

    def export_contexts(self) -> dict[int, bytes]:
        """Every node's ``Context`` as protobuf bytes (for checkpoints)."""
        return {nid: context_to_bytes(self.node_context(nid)) for nid in self._nodes}

    def import_contexts(self, contexts: dict[int, bytes]) -> None:
        """Restore node ``Context``s from :meth:`export_contexts` (resume). Nodes that are
        not in this federation any more are refused: resuming on another federation would
        silently reset their state."""
        unknown = sorted(set(map(int, contexts)) - set(self._nodes))
        if unknown:
            raise FlwrHpcError(f"the checkpoint holds nodes {unknown} that federation "
                               f"'{self.federation.name}' does not have; resume on the "
                               "federation the run started on")
        for nid, data in contexts.items():
            ctx = context_from_bytes(data)
            ctx.run_id = self.run.run_id
            self._contexts[int(nid)] = ctx

    def interrupt(self) -> None:
        """The run is stopping (safe from a signal handler): every call waiting for
        replies returns what it has within a second, and no new message is accepted."""
        self._interrupted.set()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        if self._closed or self._interrupted.is_set():
            raise RuntimeError("HPCGrid is closed" if self._closed else
                               "the run is stopping; no new messages")
        run_id = self.run.run_id
        messages = list(messages)
        for msg in messages:
            md = msg.metadata
            if md.reply_to_message_id:
                raise ValueError("HPCGrid.push_messages: a reply cannot be pushed")
            md.__dict__["_run_id"] = run_id
            md.__dict__["_src_node_id"] = SUPERLINK_NODE_ID
        # Messages of a phase share their records: every object is hashed once (in place,
        # no copies) and deflated once for all sites, here, before the staging threads.
        parts: dict[str, Parts] = {}
        with fast_object_ids(*messages):
            objects_of = {}
            for msg in messages:
                msg.metadata.__dict__["_message_id"] = msg.object_id
                objects_of[msg.object_id] = objects = get_all_nested_objects(msg)
                for oid, obj in objects.items():
                    if oid not in parts:
                        parts[oid] = object_parts(obj)
        tasks: list[Task] = []
        for msg in messages:
            md = msg.metadata
            node = self._nodes.get(md.dst_node_id)
            if node is None:
                task = Task(msg, md.message_id, ClientSlot(md.dst_node_id, "?", -1, -1, {}))
                task.immediate = Message(
                    Error(ErrorCode.NODE_UNAVAILABLE,
                          f"node {md.dst_node_id} is not part of federation "
                          f"'{self.federation.name}'"),
                    reply_to=msg,
                )
            else:
                task = Task(msg, md.message_id, node, steps=local_steps_of(msg),
                             object_ids=list(objects_of[md.message_id]))
            tasks.append(task)

        by_site: dict[str, list[Task]] = defaultdict(list)
        with self._lock:
            for t in tasks:
                self._tasks[t.message_id] = t
                if t.immediate is not None:
                    continue
                nid = t.node.node_id
                if nid in self._busy:  # still running an earlier message: wait for it
                    t.parts = {oid: parts[oid] for oid in t.object_ids}
                    self._backlog[nid].append(t)
                else:
                    self._busy[nid] = t.message_id
                    by_site[t.node.site].append(t)
        for t in tasks:
            if t.immediate is not None:
                self._mark_done(t.message_id)
        # Stage every site in parallel (I/O bound, seconds for a Transfer site) and submit
        # each site's tasks as soon as its own staging is done.
        staged = {self._stage_pool.submit(self._stage_site, site, ts, parts): site
                  for site, ts in by_site.items()}
        for fut in as_completed(staged):
            site = staged[fut]
            try:
                fut.result()
            except Exception as err:  # noqa: BLE001 - a staging failure fails that site's tasks
                log.error("staging to site '%s' failed: %s", site, err)
                for t in by_site[site]:
                    t.immediate = Message(
                        Error(ErrorCode.MESSAGE_UNAVAILABLE,
                              f"staging to site '{site}' failed: {err}"),
                        reply_to=t.message,
                    )
                    self._mark_done(t.message_id)
                continue
            for t in by_site[site]:
                self._submit(t)
        if tasks:
            self.progress.phase_started(tasks[0].round, tasks[0].phase, len(tasks))
        return [t.message_id for t in tasks]

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies: list[Message] = []
        for mid in message_ids:
            with self._lock:
                task = self._tasks.get(mid)
                ready = task is not None and not task.abandoned and self._is_ready(task)
                if ready:
                    del self._tasks[mid]
            if ready:
                replies.append(self._collect(task))
        return replies

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        """Submit ``messages`` now and return the replies that arrive before ``timeout``
        (the rest are abandoned and their late results discarded), as a list: Flower's
        contract. Safe to call from any number of threads at once."""
        return list(self.stream_replies(messages, timeout=timeout))

    def stream_replies(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterator[Message]:
        """:meth:`send_and_receive`, yielding each reply as it arrives. The grid keeps no
        reference to a yielded reply, so a strategy that aggregates while iterating holds
        one reply at a time, not all of them (``StreamingGrid`` hands this to Flower's
        round loop). The messages are submitted at once, before the first ``next()``;
        replies not consumed when the iterator is dropped are abandoned."""
        started = time.monotonic()
        ids = list(self.push_messages(messages))
        inbox: queue.Queue[str] = queue.Queue()
        with self._lock:  # replies known before this point are queued here, later ones
            for mid in ids:  # by _mark_done: each exactly once per call
                self._waiters[mid] = inbox
                task = self._tasks.get(mid)
                if task is not None and task.done_at is not None:
                    inbox.put(mid)
        return self._receive(ids, started, timeout, inbox)

    def _receive(self, ids: list[str], started: float, timeout: float | None,
                 inbox: queue.Queue[str]) -> Iterator[Message]:
        total = len(ids)
        if not total:
            return
        first = self._tasks.get(ids[0])
        round_, phase = (first.round, first.phase) if first else ("?", "?")
        pending = set(ids)
        deadline = None if timeout is None else started + timeout
        received = 0
        # Transfer sites: replies are fetched in one transfer per site, once all of the
        # site's tasks of this phase are done (or the deadline ends the wait)
        waiting: dict[str, set[str]] = defaultdict(set)
        done_at_site: dict[str, list[str]] = defaultdict(list)
        for mid in ids:
            task = self._tasks.get(mid)
            if task and task.immediate is None and self._fetches(task.node.site):
                waiting[task.node.site].add(mid)

        def ready(mids: list[str]) -> list[str]:
            """The next message ids whose replies can be collected."""
            mid = mids.pop()
            task = self._tasks.get(mid)
            site = task.node.site if task else ""
            if mid not in waiting.get(site, ()):
                return [mid]
            waiting[site].discard(mid)
            done_at_site[site].append(mid)
            if waiting[site]:
                return []
            batch = done_at_site.pop(site)
            self._fetch_replies(site, batch)
            return batch

        try:
            while pending:
                wait = 1.0 if deadline is None else min(1.0, deadline - time.monotonic())
                if wait <= 0 or self._interrupted.is_set() or self._closed:
                    break
                try:
                    mid = inbox.get(timeout=wait)
                except queue.Empty:
                    continue
                if mid not in pending:
                    continue
                for got_mid in ready([mid]):
                    got = list(self.pull_messages([got_mid]))
                    while got:  # hold no reference to a reply once it is yielded
                        reply = got.pop()
                        pending.discard(got_mid)
                        received += 1
                        self.progress.task_finished(
                            round_, phase, received, total, self._site_of(reply),
                            "error" if reply.has_error() else "ok")
                        yield reply
                        del reply
            for site, batch in list(done_at_site.items()):  # in time; the rest missed it
                done_at_site.pop(site)
                self._fetch_replies(site, batch)
                for got_mid in batch:
                    for reply in self.pull_messages([got_mid]):
                        pending.discard(got_mid)
                        received += 1
                        yield reply
        finally:  # also when the consumer stops early: nothing stays pending
            with self._lock:
                for mid in ids:
                    if self._waiters.get(mid) is inbox:
                        del self._waiters[mid]
            stopping = self._interrupted.is_set() or self._closed
            for mid in list(pending):
                self._abandon(mid, None if stopping else timeout, stopping=stopping)
            self.progress.phase_finished(round_, phase, received, total,
                                         time.monotonic() - started)

    # ------------------------------------------------------------------ internals

    def _fetches(self, site: str) -> bool:
        return self.sites[site].store.batch_fetch

    def _label(self, task: Task) -> str:
        return f"flwr-hpc run {self.run.run_id} round {task.round} {task.phase}"

    def _fetch_replies(self, site: str, message_ids: list[str]) -> None:
        """One transfer for the reply objects of every finished task of ``site``."""
        tasks = [self._tasks[m] for m in message_ids if m in self._tasks]
        wanted: list[str] = []
        for t in tasks:
            result = self._safe_result(t)
            if isinstance(result, dict) and result.get("ok"):
                wanted.extend(result.get("object_ids") or [])
        if not wanted:
            return
        try:
            self.sites[site].store.receive({}, wanted, self._label(tasks[0]))
        except Exception as err:  # noqa: BLE001 - those nodes get an error reply
            log.error("fetching replies from site '%s' failed: %s", site, err)
            for t in tasks:
                t.fetch_error = str(err)

    def _site_of(self, reply: Message) -> str:
        node = self._nodes.get(reply.metadata.src_node_id)
        return node.site if node else "?"

    def _stage_site(self, site: str, tasks: list[Task], parts: dict[str, Parts]) -> None:
        """Write everything ``site`` lacks for these tasks, each object once.
        ``parts``: every object of the phase by id (see :meth:`push_messages`)."""
        rt = self.sites[site]
        t0 = time.monotonic()
        written = 0
        if not rt.store.has(self.fab_hash):  # attributed to the first task of the site
            written += rt.store.put(self.fab_hash, self._fab_bytes)
        before = 0
        seen: set[str] = set()
        for t in tasks:
            for oid in t.object_ids:  # the message's objects, children first
                if oid not in seen and not rt.store.has(oid):
                    # the id was computed from these very bytes: no second hash
                    written += rt.store.put(oid, parts[oid], trusted=True)
                seen.add(oid)
            ctx_bytes = context_to_bytes(self.node_context(t.node.node_id))
            t.context_id = sha256_hex(ctx_bytes)
            written += rt.store.put(t.context_id, ctx_bytes, trusted=True)
            t.object_ids = [*t.object_ids, t.context_id, self.fab_hash]
            t.bytes_to_site = written - before
            before = written
        if tasks:  # a Transfer store moves all of it in one transfer task
            rt.store.flush(self._label(tasks[0]))
        elapsed = time.monotonic() - t0
        for t in tasks:
            t.stage_s = elapsed

    def _job(self, site: str, **fields: Any) -> dict[str, Any]:
        rt = self.sites[site]
        return {"v": JOB_VERSION, "run_id": self.run.run_id, "site": site,
                "fab_hash": self.fab_hash, "store": rt.store.spec(),
                "apps_dir": str(rt.apps_dir), **fields, **rt.job_extras}

    def warm_up(self) -> dict[str, str]:
        """Start every site's workers and load the run's ClientApp in them before the
        ServerApp sends its first message, so that one-off cost (worker start, imports,
        FAB install: tens of seconds on a loaded machine) is not charged to the app's
        first timeout. One warm-up task per worker of each site (``compute.workers``);
        waits at most ``compute.warmup_s`` per site (0: no warm-up) and goes on either
        way: a site still starting, or failing, is reported here and by its first task.
        Returns each site's outcome (``ok``, ``skipped``, ``still starting``, or the error).
        """
        outcome: dict[str, str] = {}
        waits: dict[str, tuple[list[Future], float]] = {}
        t0 = time.monotonic()
        for name, rt in self.sites.items():
            site = self.federation.site(name)
            budget = float(site.compute.get("warmup_s", 0.0))
            if budget <= 0 or site.compute["type"] == "sim":
                outcome[name] = "skipped"
                continue
            futures: list[Future] = []
            try:
                if not rt.store.has(self.fab_hash):
                    rt.store.put(self.fab_hash, self._fab_bytes)
                rt.store.flush(f"flwr-hpc run {self.run.run_id} warm-up")
                job = self._job(name, warmup=True)
                rt.store.attach(job, [self.fab_hash])
                if rt.backend.status() == "offline":
                    raise RuntimeError("the site's endpoint is offline")
                for _ in range(max(1, int(site.compute.get("workers", 1)))):
                    futures.append(rt.backend.submit(self._worker_fn, job))
            except Exception as err:  # noqa: BLE001 - the site's tasks will say it again
                outcome[name] = f"failed: {err}"
                continue
            waits[name] = (futures, t0 + budget)
        if waits:
            log.info("warming up %d site(s): starting workers and loading the ClientApp",
                     len(waits))
        for name, (futures, deadline) in waits.items():
            errors: list[str] = []
            for fut in futures:
                try:
                    res = fut.result(timeout=max(0.0, deadline - time.monotonic()))
                except TimeoutError:
                    errors.append("still starting")
                    continue
                except Exception as err:  # noqa: BLE001
                    errors.append(str(err))
                    continue
                if not (isinstance(res, dict) and res.get("ok")):
                    errors.append(str((res or {}).get("reason", res)))
            outcome[name] = errors[0] if errors else "ok"
            if errors:
                log.warning("site '%s' warm-up: %s", name, errors[0][-500:])
        if waits:
            log.info("site workers warm after %.1f s (%s)", time.monotonic() - t0,
                     ", ".join(f"{k}: {v.splitlines()[0][:60]}" for k, v in outcome.items()))
        return outcome

    def _submit(self, task: Task) -> None:
        rt = self.sites[task.node.site]
        job = self._job(task.node.site, node_id=task.node.node_id,
                        message_id=task.message_id, context_id=task.context_id)
        task.submitted_at = self.clock.now()
        try:
            rt.store.attach(job, task.object_ids)  # inline: the objects, size checked
            if rt.backend.status() == "offline":  # Globus would hold the task for 2 weeks
                raise RuntimeError("the site's endpoint is offline; its nodes sit out "
                                   "this round")
            task.future = rt.backend.submit(self._worker_fn, job)
        except Exception as err:  # noqa: BLE001
            task.immediate = Message(
                Error(ErrorCode.NODE_UNAVAILABLE,
                      f"submit to site '{task.node.site}' failed: {err}"),
                reply_to=task.message,
            )
            self._mark_done(task.message_id)
            return
        task.future.add_done_callback(lambda _f, mid=task.message_id: self._on_done(mid))

    def _on_done(self, message_id: str) -> None:
        with self._lock:
            task = self._tasks.get(message_id)
            late = task is not None and task.abandoned
            if late:
                del self._tasks[message_id]
        if late:
            task.done_at = self.clock.now()
            log.info("discarded late result of node %s (site %s, round %s, %s)",
                     task.node.node_id, task.node.site, task.round, task.phase)
            self._record(task, "late-discarded", result=self._safe_result(task))
            return
        if task is not None:
            self._update_context(task)
        self._mark_done(message_id)

    def _update_context(self, task: Task) -> None:
        """The node's Context as its ClientApp left it, kept as soon as the task finishes
        (as a SuperNode does), whether or not the ServerApp ever pulls the reply. The
        node runs one message at a time, so updates arrive in order. A late result (its
        node was dropped from the round) leaves the Context as it was."""
        result = self._safe_result(task)
        if not isinstance(result, dict) or not result.get("ok") or not result.get(
                "context_id") or result.get("message_id") != task.message_id:
            return
        context_id = str(result["context_id"])
        try:
            inline = result.get("context")
            if inline is not None:
                data = base64.b64decode(inline)
                if sha256_hex(data) != context_id:
                    raise FlwrHpcError(f"the Context returned inline does not match its "
                                       f"sha256 {context_id[:16]}…")
            else:
                store = self.sites[task.node.site].store
                store.receive(result, [context_id], self._label(task))
                data = store.get(context_id)
            context = context_from_bytes(data)
        except Exception as err:  # noqa: BLE001 - the node keeps its previous Context
            log.error("node %s (site %s): could not read the Context its ClientApp "
                      "returned (%s); the node keeps its previous Context",
                      task.node.node_id, task.node.site, err)
            return
        self._contexts[task.node.node_id] = context

    def _abandon(self, message_id: str, timeout: float | None, *,
                 stopping: bool = False) -> None:
        with self._lock:
            task = self._tasks.get(message_id)
            if task is None:
                return
            task.abandoned = True
        self._release_node(task)  # a dropped message no longer holds its node
        if timeout is None and self._is_ready(task):  # finished, never pulled by the app
            self._record(task, "not-pulled", result=self._safe_result(task))
            return
        if stopping:  # the run was asked to stop: not a missed deadline either
            log.info("node %s (site %s): round %s (%s) abandoned, the run is stopping",
                     task.node.node_id, task.node.site, task.round, task.phase)
            self._record(task, "stopped")
            return
        if timeout is None:  # the grid is closing (end of run): not a missed deadline
            log.info("node %s (site %s) still had round %s (%s) in flight at the end of the "
                     "run; its result will be discarded", task.node.node_id, task.node.site,
                     task.round, task.phase)
            self._record(task, "abandoned")
            return
        log.warning("node %s (site %s) missed the %s s deadline of round %s (%s); "
                    "dropped from the round, its late result will be discarded",
                    task.node.node_id, task.node.site, timeout, task.round, task.phase)
        self._record(task, "timeout")

    @staticmethod
    def _safe_result(task: Task) -> dict | None:
        try:
            return task.future.result(timeout=0) if task.future else None
        except Exception:  # noqa: BLE001
            return None

    def _error_reply(self, task: Task, code: int, reason: str) -> Message:
        reply = Message(Error(code=code, reason=reason), reply_to=task.message)
        reply.metadata.__dict__["_message_id"] = reply.object_id
        return reply

    def _collect(self, task: Task) -> Message:
        """Turn a finished task into the reply the strategy sees (never raises)."""
        if task.immediate is not None:
            reply = task.immediate
            reply.metadata.__dict__["_message_id"] = reply.object_id
            self._record(task, _error_outcome(reply.error.code),
                         error=reply.error.reason)
            return reply
        assert task.future is not None
        try:
            result = task.future.result()
        except WorkerLostError as err:
            self._record(task, "error:CLIENT_APP_CRASHED", error=str(err))
            return self._error_reply(task, ErrorCode.CLIENT_APP_CRASHED, str(err))
        except RemoteTaskError as err:
            self._record(task, "error:UNKNOWN", error=err.remote_traceback[-2000:])
            return self._error_reply(task, ErrorCode.UNKNOWN, str(err))
        except Exception as err:  # noqa: BLE001
            self._record(task, "error:UNKNOWN", error=repr(err))
            return self._error_reply(task, ErrorCode.UNKNOWN, repr(err))
        if not isinstance(result, dict) or result.get("message_id") != task.message_id:
            self._record(task, "error:UNKNOWN", error="mismatched task result")
            return self._error_reply(task, ErrorCode.UNKNOWN,
                                     "site returned a result for a different message")
        if not result.get("ok"):
            code = int(result.get("error_code", ErrorCode.UNKNOWN))
            self._record(task, _error_outcome(code), result=result,
                         error=result.get("reason"))
            return self._error_reply(task, code, str(result.get("reason")))

        store = self.sites[task.node.site].store
        t0 = time.monotonic()
        read_bytes = 0

        def read(oid: str) -> bytes:
            nonlocal read_bytes
            data = store.get(oid)
            read_bytes += len(data)
            return data

        try:
            if task.fetch_error:
                raise FlwrHpcError(task.fetch_error)
            # inline: the objects the result carries (or its file reply); Transfer: a
            # no-op when send_and_receive fetched the site's batch already
            store.receive(result, result.get("object_ids") or [result["reply_id"]],
                          self._label(task))
            reply = inflate_message(result["reply_id"], read)
            md = reply.metadata
            if md.reply_to_message_id != task.message_id or md.src_node_id != task.node.node_id:
                raise FlwrHpcError(
                    f"reply {result['reply_id'][:16]}… answers message "
                    f"{md.reply_to_message_id[:16]}… from node {md.src_node_id}, not "
                    f"{task.message_id[:16]}… from node {task.node.node_id}"
                )
        except Exception as err:  # noqa: BLE001 - corrupted/mismatched replies are never used
            log.error("rejected reply of node %s (site %s): %s",
                      task.node.node_id, task.node.site, err)
            self._record(task, "error:REPLY_MESSAGE_UNAVAILABLE", result=result, error=str(err))
            return self._error_reply(task, ErrorCode.REPLY_MESSAGE_UNAVAILABLE, str(err))
        fetch_s = time.monotonic() - t0
        outcome = "ok"
        err_text = None
        if reply.has_error():
            outcome = _error_outcome(reply.error.code)
            err_text = reply.error.reason
        self._record(task, outcome, result=result, bytes_from_site=read_bytes,
                     fetch_s=fetch_s, error=err_text)
        return reply

    def _record(self, task: Task, outcome: str, *, result: dict | None = None,
                bytes_from_site: int = 0, fetch_s: float = 0.0, error: str | None = None) -> None:
        timing = self._timing(task, outcome, result, fetch_s)
        self.timings.add(timing)
        self.task_log.write({
            "run_id": self._run.run_id if self._run else None,
            "message_id": task.message_id,
            "node_id": task.node.node_id,
            "site": task.node.site,
            "phase": task.phase,
            "round": task.round,
            "outcome": outcome,
            "bytes_to_site": task.bytes_to_site,
            "bytes_from_site": bytes_from_site,
            "stage_s": round(task.stage_s, 6),
            "queue_wait_s": _r6(timing.queue_wait_s),
            "run_s": _r6(timing.run_s),
            "fetch_s": round(fetch_s, 6),
            "transfer_s": _r6(timing.transfer_s),
            "turnaround_s": _r6(timing.turnaround_s),
            "steps": task.steps,
            "clock": "virtual" if self.clock.virtual else "server",
            "ranks": (result or {}).get("ranks", 1),
            "launcher": (result or {}).get("launcher", "none"),
            # the site worker process that ran it and its ClientApp load time: a warm
            # worker keeps its pid across rounds and loads in milliseconds
            "worker_pid": (result or {}).get("pid"),
            "load_s": _r6((result or {}).get("load_s")),
            "submitted_at": task.submitted_at,
            "error": (error or None) and str(error)[-1000:],
        })

    def _timing(self, task: Task, outcome: str, result: dict | None,
                fetch_s: float) -> TaskTiming:
        """The task's durations, every one measured on the server's clock: the site's
        ``finished_at - started_at`` is a difference on one clock, so offsets cancel."""
        started = (result or {}).get("started_at")
        finished = (result or {}).get("finished_at")
        run_s = (finished - started) if started and finished else None
        turnaround = (task.done_at - task.submitted_at
                      if task.done_at is not None and task.submitted_at else None)
        queue_wait = (max(turnaround - run_s, 0.0)
                      if turnaround is not None and run_s is not None else None)
        return TaskTiming(site=task.node.site, node_id=task.node.node_id, round=task.round,
                          phase=task.phase, outcome=outcome, submitted_at=task.submitted_at,
                          turnaround_s=turnaround, queue_wait_s=queue_wait, run_s=run_s,
                          transfer_s=task.stage_s + fetch_s, steps=task.steps)

    def close(self) -> None:
        """Drop in-flight tasks and shut every site backend down (kills local workers)."""
        if self._closed:
            return
        self._closed = True
        with self._lock:
            inflight = [mid for mid, t in self._tasks.items() if not t.abandoned]
        for mid in inflight:
            self._abandon(mid, None)
        with ThreadPoolExecutor(max_workers=max(1, len(self.sites))) as pool:
            list(pool.map(lambda rt: rt.backend.close(), self.sites.values()))
        self._stage_pool.shutdown(wait=False)

    def __enter__(self) -> HPCGrid:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
