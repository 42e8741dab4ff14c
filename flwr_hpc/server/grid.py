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

The grid keeps the Grid API, the node Contexts and the life of each message (push,
submit, wait, pull, abandon); the rest is in its own module: task records
(:mod:`.tasks`), staging and jobs (:mod:`.staging`), result to reply (:mod:`.replies`),
site wiring (:mod:`.sites`), and whose time the run lives in (:mod:`.delivery`: the wall
clock here, a virtual clock under the simulator).

This module is over 400 lines on purpose: it is the life of one message in one place
(push, per-node backlog, submit, wait, pull, abandon, close), all under one lock and one
condition; split across files, the locking could no longer be checked in one read.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any, Self, cast

from flwr.app import Context, Error, Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.proto.node_pb2 import NodeInfo  # pylint: disable=E0611
from flwr.serverapp import Grid
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.run import Run
from typing_extensions import override

from flwr_hpc.compute import ComputeBackend
from flwr_hpc.config import SUPERLINK_NODE_ID, ClientSlot, FederationConfig
from flwr_hpc.errors import FlwrHpcError
from flwr_hpc.payload.objects import Parts, fast_object_ids, object_parts
from flwr_hpc.protocol import context_from_bytes, context_to_bytes
from flwr_hpc.server.delivery import Delivery, WallDelivery
from flwr_hpc.server.replies import collect, discard, returned_context
from flwr_hpc.server.sites import SiteRuntime, build_sites
from flwr_hpc.server.staging import Staging
from flwr_hpc.server.tasks import Task, task_record
from flwr_hpc.server.telemetry import Progress, TaskLog
from flwr_hpc.server.timing import SiteTimings, local_steps_of
from flwr_hpc.worker import run_task

log = logging.getLogger("flwr_hpc")

__all__ = ["HPCGrid", "SiteRuntime", "Task"]


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
    delivery : Delivery, optional
        Whose time the run lives in (default :class:`WallDelivery`, the server's clock).
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
        delivery: Delivery | None = None,
    ) -> None:
        self.federation = federation
        self.sites = sites
        self.staging = Staging(sites, fab_bytes, lambda: self.run.run_id)
        self.fab_hash = self.staging.fab_hash
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
        self._fault_rngs: dict[str, random.Random] = {}  # faults.dropout, one per site
        self._backlog: dict[int, deque[Task]] = defaultdict(deque)
        self._lock = threading.RLock()
        self._closed = False
        self._interrupted = threading.Event()  # the run is stopping: every wait ends
        self._cond = threading.Condition()  # notified whenever a task's result is known
        self.delivery: Delivery = delivery or WallDelivery()
        self.clock = self.delivery.clock  # every timing signal is read on it
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
        **kwargs: Any,
    ) -> Self:
        """Build backends (unless given) and stores for every site and return a ready
        grid. :func:`flwr_hpc.server.wiring.make_grid` picks the grid for a federation.
        """
        from flwr_hpc.fab import heavy_imports

        sites = build_sites(federation, run_dir=run_dir, flwr_home=flwr_home,
                            backends=backends, preload=tuple(heavy_imports(fab_bytes)))
        return cls(federation, sites, fab_bytes, run_config=run_config,
                   task_log=TaskLog(run_dir / "tasks.jsonl"), progress=progress, **kwargs)

    # ------------------------------------------------------------------ Grid API

    @override
    def set_run(self, run: Run) -> None:
        if not isinstance(run, Run):
            raise TypeError(f"`run` must be an instance of Run, got {type(run).__name__}")
        self._run = run

    @property
    @override
    def run(self) -> Run:
        if self._run is None:
            raise RuntimeError("HPCGrid.set_run() has not been called")
        return Run(**vars(self._run))

    @override
    def create_message(  # noqa: PLR0913 - Flower's signature
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    @override
    def get_node_ids(self) -> Iterable[int]:
        return list(self._nodes)

    @override
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
        strategies use to keep sites busy across rounds.
        """
        return self.delivery.wait_any(self, list(message_ids), until)

    def live_tasks(self, message_ids: Iterable[str]) -> dict[str, Task]:
        """The tasks of ``message_ids`` still in flight (pushed, not pulled or dropped)."""
        with self._lock:
            return {m: t for m in message_ids
                    if (t := self._tasks.get(m)) is not None and not t.abandoned}

    def await_results(self, message_ids: Iterable[str], *, until: float | None = None,
                      every: bool = False) -> list[str]:
        """Block until one (``every``: each) of the in-flight ``message_ids`` has its
        result, the grid clock reaches ``until``, or the run stops; return the ids whose
        result is known now.
        """
        ids = list(message_ids)
        with self._cond:
            while True:
                live = self.live_tasks(ids)
                ready = [m for m, t in live.items() if t.ready]
                done = len(ready) == len(live) if every else bool(ready)
                if done or not live or self._interrupted.is_set() or self._closed:
                    return ready
                wait = None if until is None else until - self.clock.now()
                if wait is not None and wait <= 0:
                    return ready
                self._cond.wait(timeout=1.0 if wait is None else min(wait, 1.0))

    def _mark_done(self, message_id: str) -> None:
        task = self._tasks.get(message_id)
        if task is not None and task.done_at is None:
            task.done_at = self.delivery.finished_at(task)
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
        node's previous message left).
        """
        parts, task.parts = task.parts or {}, None
        try:
            self.staging.stage(task.node.site, [task], parts, self.node_context,
                               self._label(task))
        except Exception as err:  # noqa: BLE001 - that node gets an error reply
            log.error("staging to site '%s' failed: %s", task.node.site, err)
            self._end_early(task, Error(ErrorCode.MESSAGE_UNAVAILABLE,
                                        f"staging to site '{task.node.site}' failed: {err}"))
            return
        self._submit(task)

    def _end_early(self, task: Task, error: Error | Message) -> None:
        """``task`` ends without running: its reply is ``error`` (or a ready reply)."""
        task.immediate = (error if isinstance(error, Message)
                          else Message(error, reply_to=task.message))
        self._mark_done(task.message_id)

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
        silently reset their state.
        """
        unknown = sorted(set(map(int, contexts)) - set(self._nodes))
        if unknown:
            raise FlwrHpcError(f"the checkpoint holds nodes {unknown} that federation "
                               f"'{self.federation.name}' does not have; resume on the "
                               "federation the run started on")
        for nid, data in contexts.items():
            ctx = context_from_bytes(data)
            ctx.run_id = self.run.run_id
            self._contexts[int(nid)] = ctx

    @property
    def stopping(self) -> bool:
        """The run is stopping or the grid is closed: waits end, no message is accepted."""
        return self._interrupted.is_set() or self._closed

    def interrupt(self) -> None:
        """The run is stopping (safe from a signal handler): every call waiting for
        replies returns what it has within a second, and no new message is accepted.
        """
        self._interrupted.set()

    @override
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
            # sites still running earlier messages will likely be sent these objects next
            busy_sites = {self._nodes[nid].site for nid in self._busy
                          if nid in self._nodes} - set(by_site)
        for t in tasks:
            if t.immediate is not None:
                self._mark_done(t.message_id)
        # Stage every site in parallel (I/O bound, seconds for a Transfer site) and submit
        # each site's tasks as soon as its own staging is done.
        staged = {self._stage_pool.submit(self.staging.stage, site, ts, parts,
                                          self.node_context, self._label(ts[0])): site
                  for site, ts in by_site.items()}
        if busy_sites and tasks:  # after this push's own staging, not waited for
            for site in sorted(busy_sites):
                self._stage_pool.submit(self.staging.prestage, site, parts,
                                        self._label(tasks[0]))
        for fut in as_completed(staged):
            site = staged[fut]
            try:
                fut.result()
            except Exception as err:  # noqa: BLE001 - a staging failure fails that site's tasks
                log.error("staging to site '%s' failed: %s", site, err)
                for t in by_site[site]:
                    self._end_early(t, Error(ErrorCode.MESSAGE_UNAVAILABLE,
                                             f"staging to site '{site}' failed: {err}"))
                continue
            for t in by_site[site]:
                self._submit(t)
        if tasks:
            self.progress.phase_started(tasks[0].round, tasks[0].phase, len(tasks))
        return [t.message_id for t in tasks]

    @override
    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._pull(message_ids)

    def _pull(self, message_ids: Iterable[str], lazy: bool = False) -> list[Message]:
        replies: list[Message] = []
        for mid in message_ids:
            with self._lock:
                task = self._tasks.get(mid)
                ready = (task is not None and not task.abandoned and task.ready
                         and self.delivery.is_due(task))
                if ready:
                    del self._tasks[mid]
            if ready:
                replies.append(self._collect(cast(Task, task), lazy))  # ready: not None
        return replies

    @override
    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        """Submit ``messages`` now and return the replies that arrive before ``timeout``
        (the rest are abandoned and their late results discarded), as a list: Flower's
        contract. Safe to call from any number of threads at once.
        """
        return list(self.stream_replies(messages, timeout=timeout))

    def stream_replies(
        self, messages: Iterable[Message], *, timeout: float | None = None,
        lazy_arrays: bool = False,
    ) -> Iterator[Message]:
        """:meth:`send_and_receive`, yielding each reply as it arrives. The grid keeps no
        reference to a yielded reply, so a strategy that aggregates while iterating holds
        one reply at a time, not all of them (``StreamingGrid`` hands this to Flower's
        round loop). The messages are submitted at once, before the first ``next()``;
        replies not consumed when the iterator is dropped are abandoned. With
        ``lazy_arrays``, a reply's arrays are read from the site's store when the strategy
        first asks for them (:class:`~flwr_hpc.payload.objects.StoredArray`), so one that
        takes and releases one array at a time holds one array, not the whole reply.
        """
        started = self.delivery.now()
        ids = list(self.push_messages(messages))
        inbox: queue.Queue[str] = queue.Queue()
        with self._lock:  # replies known before this point are queued here, later ones
            for mid in ids:  # by _mark_done: each exactly once per call
                self._waiters[mid] = inbox
                task = self._tasks.get(mid)
                if task is not None and task.done_at is not None:
                    inbox.put(mid)
        return self._receive(ids, started, timeout, inbox, lazy_arrays)

    def _receive(self, ids: list[str], started: float, timeout: float | None,
                 inbox: queue.Queue[str], lazy: bool) -> Iterator[Message]:
        total = len(ids)
        if not total:
            return
        first = self._tasks.get(ids[0])
        round_, phase = (first.round, first.phase) if first else ("?", "?")
        self.progress.waiting(round_, phase)
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
            while pending and not (self._interrupted.is_set() or self._closed):
                got_ids = self.delivery.next_ready(self, inbox, pending, deadline)
                if got_ids is None:  # the deadline has passed
                    break
                for got_mid in [m for mid in got_ids if mid in pending
                                for m in ready([mid])]:
                    got = self._pull([got_mid], lazy)
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
                    for reply in self._pull([got_mid], lazy):
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
                                         self.delivery.now() - started)

    # ------------------------------------------------------------------ internals

    def _fetches(self, site: str) -> bool:
        return self.sites[site].store.batch_fetch

    def _label(self, task: Task) -> str:
        return f"flwr-hpc run {self.run.run_id} round {task.round} {task.phase}"

    def _fetch_replies(self, site: str, message_ids: list[str]) -> None:
        """One transfer for the reply objects of every finished task of ``site``."""
        tasks = [self._tasks[m] for m in message_ids if m in self._tasks]
        wanted: list[str] = []
        carried: dict[str, str] = {}  # small objects the results brought along
        for t in tasks:
            result = t.safe_result()
            if isinstance(result, dict) and result.get("ok"):
                wanted.extend(result.get("object_ids") or [])
                carried.update(result.get("objects") or {})
        if not wanted:
            return
        try:
            self.sites[site].store.receive({"objects": carried}, wanted,
                                           self._label(tasks[0]))
        except Exception as err:  # noqa: BLE001 - those nodes get an error reply
            log.error("fetching replies from site '%s' failed: %s", site, err)
            for t in tasks:
                t.fetch_error = str(err)

    def _site_of(self, reply: Message) -> str:
        node = self._nodes.get(reply.metadata.src_node_id)
        return node.site if node else "?"

    def warm_up(self) -> dict[str, str]:
        """Start every site's workers and load the run's ClientApp in them before the
        ServerApp sends its first message, so that one-off cost (worker start, imports,
        FAB install: tens of seconds on a loaded machine) is not charged to the app's
        first timeout (see :meth:`Staging.warm_up`). Returns each site's outcome.
        """
        return self.staging.warm_up(self.federation, self._worker_fn,
                                    f"flwr-hpc run {self.run.run_id} warm-up")

    def _submit(self, task: Task) -> None:
        rt = self.sites[task.node.site]
        job = self.staging.job(task.node.site, node_id=task.node.node_id,
                               message_id=task.message_id, context_id=task.context_id)
        planned = self.delivery.submitting(self, task) or self._injected_fault(task)
        if planned is not None:  # ends here without running (a simulated or injected loss)
            self._end_early(task, planned)
            return
        try:
            rt.store.attach(job, task.object_ids)  # inline: the objects, size checked
            if rt.backend.status() == "offline":  # Globus would hold the task for 2 weeks
                raise RuntimeError("the site's endpoint is offline; its nodes sit out "
                                   "this round")
            task.future = rt.backend.submit(self._worker_fn, job)
        except Exception as err:  # noqa: BLE001
            self._end_early(task, Error(ErrorCode.NODE_UNAVAILABLE,
                                        f"submit to site '{task.node.site}' failed: {err}"))
            return
        task.future.add_done_callback(
            lambda _f, mid=task.message_id: self._on_done(mid))  # type: ignore[misc]

    def _injected_fault(self, task: Task) -> Error | None:
        """The site's ``faults.dropout``: this task lost before it runs, or None. One seeded
        draw per task submitted to the site, in submission order.
        """
        faults = self.federation.site(task.node.site).faults
        if not faults["dropout"]:
            return None
        with self._lock:
            rng = self._fault_rngs.setdefault(
                task.node.site, random.Random(f"{faults['seed']}:{task.node.site}"))
            lost = rng.random() < faults["dropout"]
        if not lost:
            return None
        return Error(ErrorCode.NODE_UNAVAILABLE,
                     f"fault injection: site '{task.node.site}' lost node {task.node.node_id} "
                     f"(faults.dropout={faults['dropout']})")

    def _on_done(self, message_id: str) -> None:
        with self._lock:
            task = self._tasks.get(message_id)
            late = task is not None and task.abandoned
            if late:
                del self._tasks[message_id]
        if late:
            task = cast(Task, task)  # late: not None
            task.done_at = self.clock.now()
            log.info("discarded late result of node %s (site %s, round %s, %s)",
                     task.node.node_id, task.node.site, task.round, task.phase)
            self._record(task, "late-discarded", result=task.safe_result())
            rt = self.sites.get(task.node.site)
            discard(task, rt.store if rt else None)  # its reply's files, never to be read
            return
        if task is not None:
            self._update_context(task)
        self._mark_done(message_id)

    def _update_context(self, task: Task) -> None:
        """The node's Context as its ClientApp left it, kept as soon as the task finishes
        (as a SuperNode does), whether or not the ServerApp ever pulls the reply. The
        node runs one message at a time, so updates arrive in order. A late result (its
        node was dropped from the round) leaves the Context as it was.
        """
        context = returned_context(task, self.sites[task.node.site].store, self._label(task))
        if context is not None:
            self._contexts[task.node.node_id] = context

    def _abandon(self, message_id: str, timeout: float | None, *,
                 stopping: bool = False) -> None:
        with self._lock:
            task = self._tasks.get(message_id)
            if task is None:
                return
            task.abandoned = True
        self._release_node(task)  # a dropped message no longer holds its node
        if task.ready:  # finished already: its reply's files will never be read (a task
            # finishing from now on is discarded as late, in _on_done)
            rt = self.sites.get(task.node.site)
            discard(task, rt.store if rt else None)
        if timeout is None and task.ready:  # finished, never pulled by the app
            self._record(task, "not-pulled", result=task.safe_result())
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

    def _collect(self, task: Task, lazy: bool = False) -> Message:
        """Turn a finished task into the reply the strategy sees (never raises)."""
        rt = self.sites.get(task.node.site)  # none for a node outside the federation
        return collect(task, rt.store if rt else None, self._label(task), self._record,
                       lazy=lazy)

    def _record(self, task: Task, outcome: str, *, result: dict | None = None,
                bytes_from_site: int = 0, fetch_s: float = 0.0, error: str | None = None) -> None:
        timing = self.delivery.timing(task, outcome, result, fetch_s)
        self.timings.add(timing)
        rt = self.sites.get(task.node.site)
        self.task_log.write(task_record(
            task, outcome, timing, run_id=self._run.run_id if self._run else None,
            virtual=self.clock.virtual, result=result, bytes_from_site=bytes_from_site,
            fetch_s=fetch_s, error=error, nodes=rt.nodes if rt else 1))

    def close(self) -> None:
        """Drop in-flight tasks and shut every site backend down (kills local workers)."""
        if self._closed:
            return
        self._closed = True
        with self._lock:
            inflight = [mid for mid, t in self._tasks.items() if not t.abandoned]
        for mid in inflight:
            self._abandon(mid, None)
        self.progress.close()
        with ThreadPoolExecutor(max_workers=max(1, len(self.sites))) as pool:
            list(pool.map(lambda rt: rt.backend.close(), self.sites.values()))
        self._stage_pool.shutdown(wait=False)

    def __enter__(self) -> HPCGrid:
        """The grid itself; leaving the block closes it."""
        return self

    def __exit__(self, *exc: object) -> None:
        """:meth:`close` the grid."""
        self.close()
