"""The ``globus-transfer`` payload store: server-orchestrated third-party Globus Transfer.

The server writes objects into its own staging directory, which is exposed by a Globus
collection (``transfer.collection_id`` / ``collection_path``; ``transfer.path`` is the same
directory as the server process sees it). For every site and every direction of a phase it
submits **one** transfer task that carries every object the site lacks (or every reply
object the server lacks), from collection to collection, so sites need no Transfer
credentials and compute nodes never need a network path to the server. The worker at the
site reads and writes the same store as plain files (``payload.path``), exactly like the
``shared-fs`` store.

What the Transfer service does not do, this module does (see the Globus reference sheet):

* ``sync_level="checksum"`` + ``verify_checksum=True``, and the reader still verifies the
  sha256 of every object;
* an explicit ``deadline`` on every task, a local deadline too, ``faults`` watched while the
  task stays ACTIVE (a missing source is retried silently until the deadline) and the task
  cancelled past ``max_faults``;
* FAILED, INACTIVE and ``ConsentRequired`` turned into errors that say what to do;
* the ``submission_id`` fetched first and kept, so a resubmit after a network error cannot
  create a second task;
* ``data_access`` scopes added for non-high-assurance GCSv5 *mapped* collections only (on
  guest collections that scope is an "Unknown Scope" error).

Credentials (:mod:`flwr_hpc.globus_auth`): the confidential client of
``GLOBUS_COMPUTE_CLIENT_ID`` / ``GLOBUS_COMPUTE_CLIENT_SECRET`` (each collection must grant
``<client id>@clients.auth.globus.org`` access), else the user's ``flwr-hpc login``
(refreshed as needed; a run never prompts); never logged.

One cohesive thing (over 400 lines): the Transfer store and the fault handling the service
needs (deadlines, fault watching, cancellation), which only make sense together.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from flwr_hpc import globus_auth
from flwr_hpc.errors import GlobusServiceError, PayloadMissingError
from flwr_hpc.globus_auth import ENV_CLIENT_ID, ENV_CLIENT_SECRET
from flwr_hpc.payload.inline import encode
from flwr_hpc.payload.objects import (
    ObjectData,
    check_object_id,
    data_len,
    join_parts,
    verify_object,
)
from flwr_hpc.payload.store import FilesystemStore, StoreDefaults

log = logging.getLogger(__name__)

SUBMIT_ATTEMPTS = 3
INLINE_JOB_BYTES = 2 * 1024 * 1024  # small objects one phase puts inside a site's tasks
SMALL_CACHE_BYTES = 64 * 1024 * 1024  # small objects kept for later tasks (LRU)
_LABEL_BAD = re.compile(r"[^A-Za-z0-9 _,.-]")

_tc_lock = threading.Lock()
_tc: Any = None
_checked_collections: dict[str, bool] = {}  # collection id -> needs data_access


class TransferError(GlobusServiceError):
    """A transfer task failed, stalled, expired or could not be submitted."""

    def __init__(self, site: str | None, problem: str, task_id: str | None = None) -> None:
        super().__init__(site, problem)
        self.task_id = task_id


# ----------------------------------------------------------------------------- client


def set_transfer_client(client: Any) -> None:
    """Use ``client`` (a ``globus_sdk.TransferClient``) for every site: tests, or a client
    the caller built with its own app or authorizer.
    """
    global _tc
    with _tc_lock:
        _tc = client
        _checked_collections.clear()


def transfer_client(collections: Iterable[str] = ()) -> Any:
    """The process's one ``TransferClient``, with ``data_access`` for ``collections``.

    Built on first use from the confidential client in the environment. Each collection is
    looked up once (``get_endpoint``): an unknown or inaccessible collection is an error
    naming it, and a non-high-assurance GCSv5 mapped collection gets its ``data_access``
    scope added to the app.
    """
    global _tc
    with _tc_lock:
        if _tc is None:
            _tc = _new_client()
        tc = _tc
        mapped = []
        for coll in dict.fromkeys(collections):
            if coll in _checked_collections:
                continue
            try:
                doc = _call(task_monitor(tc).budget, tc.get_endpoint, coll)
            except Exception as err:  # noqa: BLE001
                raise TransferError(None, f"collection {coll}: {explain(err)}") from None
            needs = (doc.get("entity_type") == "GCSv5_mapped_collection"
                     and not doc.get("high_assurance"))
            _checked_collections[coll] = needs
            if needs:
                mapped.append(coll)
        if mapped:
            import globus_sdk

            try:
                tc.add_app_data_access_scope(mapped)
            except globus_sdk.GlobusSDKUsageError:  # a client built with an authorizer
                log.warning("collections %s need a data_access scope, but the Transfer "
                            "client has no GlobusApp; its token must already include it",
                            ", ".join(mapped))
        return tc


def _new_client() -> Any:
    import globus_sdk

    creds = globus_auth.confidential_credentials()
    if creds:
        app = globus_sdk.ClientApp("flwr-hpc", client_id=creds[0], client_secret=creds[1],
                                   config=globus_sdk.GlobusAppConfig(token_storage="memory"))
        return globus_sdk.TransferClient(app=app)
    if globus_auth.has_user_login():
        return globus_sdk.TransferClient(app=globus_auth.shared_user_app())
    raise GlobusServiceError(
        None, f"no Globus credentials for Transfer: run 'flwr-hpc login' once (your own "
        f"Globus identity; refreshable tokens kept in {globus_auth.token_file()}), or set "
        f"{ENV_CLIENT_ID} and {ENV_CLIENT_SECRET} (a confidential client; every "
        "collection must grant <client id>@clients.auth.globus.org access)")


def explain(err: BaseException) -> str:
    """A Globus API error as one line that says what to do."""
    if isinstance(err, GlobusServiceError):  # e.g. a run that would need a login prompt
        return err.problem
    if globus_auth.is_revoked_login(err):
        return ("Globus Auth refused the stored refresh token (invalid_grant: revoked, or "
                f"unused for months): {globus_auth.LOGIN_HINT}")
    code = str(getattr(err, "code", "") or "")
    status = getattr(err, "http_status", None)
    message = str(getattr(err, "message", "") or err)
    if code == "ConsentRequired" or "ConsentRequired" in code:
        scopes = _required_scopes(err)
        return ("consent required (ConsentRequired) for "
                f"{', '.join(scopes) or 'a data_access scope'}: the collection is a mapped "
                "collection whose data_access scope was not granted; for a confidential "
                "client, ask the collection's admin to allow the client identity, for a "
                f"user login run: globus session consent '{' '.join(scopes)}'")
    if status == 404 or code.endswith("NotFound"):
        return f"not found ({code or status}): check the collection id and path — {message}"
    if status == 403 or "PermissionDenied" in code:
        return (f"permission denied ({code or status}): the collection must grant the "
                "server's identity (for a confidential client "
                "<client id>@clients.auth.globus.org) read and write access to the store "
                f"directory — {message}")
    if status == 401:
        return (f"the Transfer token was refused (401): check {ENV_CLIENT_ID} / "
                f"{ENV_CLIENT_SECRET}, or run 'flwr-hpc login' again — {message}")
    if "EndpointError" in code or "ExternalError" in code:
        return f"the collection is not reachable ({code}); is it online? — {message}"
    if status:
        return f"{code or 'error'} (HTTP {status}): {message}"
    return f"{type(err).__name__}: {message}"


def _required_scopes(err: BaseException) -> list[str]:
    try:
        from globus_sdk import gare

        for g in gare.to_gares([cast(Any, err)]):
            scopes = g.authorization_parameters.required_scopes
            if scopes:
                return list(scopes)
    except Exception:  # noqa: BLE001 - best effort: the message still says what to do
        pass
    info = getattr(err, "raw_json", None) or {}
    return list(info.get("required_scopes") or [])


# ----------------------------------------------------------------------------- transfers


@dataclass(frozen=True)
class TransferSettings:
    """The server side of Transfer (the federation's ``transfer`` section)."""

    collection_id: str
    collection_path: str
    path: str
    deadline_s: float = 900.0
    poll_s: float = 2.0
    max_faults: int = 5
    requests_per_s: float = 10.0
    inline_max_bytes: int = 256 * 1024
    prestage: bool = True
    max_active_tasks: int = 3

    @classmethod
    def from_config(cls, section: dict[str, Any]) -> TransferSettings:
        """The settings from the ``transfer`` section (extra keys ignored, every field
        required).
        """
        return cls(**{k: section[k] for k in cls.__dataclass_fields__})


@dataclass
class TransferReport:
    """One transfer task that succeeded: its id, files and bytes moved, seconds from
    submission to success, and final status.
    """

    task_id: str
    files: int
    bytes: int
    seconds: float
    status: str


def safe_label(text: str) -> str:
    """Transfer labels allow letters, digits, space and ``_,.-`` only, 128 characters."""
    return _LABEL_BAD.sub("-", text)[:128]


def _object_path(root: str, object_id: str) -> str:
    oid = check_object_id(object_id)
    return f"{root.rstrip('/')}/objects/{oid[:2]}/{oid}"


# ----------------------------------------------------------------------------- budget


class RequestBudget:
    """At most ``rate`` requests per second on average, in bursts of at most ``burst``
    (a generic cell-rate limiter): in any window of W seconds at most ``burst + rate * W``
    requests start. Shared by every Transfer request of the process.
    """

    def __init__(self, rate: float, burst: int | None = None) -> None:
        self.rate = float(rate)
        self.burst = max(1, int(burst if burst is not None else rate))
        self._tat = 0.0  # theoretical arrival time of the next request
        self._lock = threading.Lock()
        self.waited_s = 0.0

    def acquire(self) -> None:
        """Wait until one more request fits the budget."""
        with self._lock:
            now = time.monotonic()
            tat = max(self._tat, now)
            wait = tat - now - (self.burst - 1) / self.rate
            self._tat = tat + 1.0 / self.rate
            self.waited_s += max(0.0, wait)
        if wait > 0:
            time.sleep(wait)


def _call(budget: RequestBudget, fn: Any, *args: Any, **kwargs: Any) -> Any:
    """One Transfer request, within ``budget``."""
    budget.acquire()
    return fn(*args, **kwargs)


# ----------------------------------------------------------------------------- monitor


class _Watch:
    def __init__(self, poll_s: float) -> None:
        self.poll_s = poll_s
        self.doc: dict[str, Any] | None = None
        self.error: str | None = None
        self.fatal = False  # the error will not go away by polling again
        self.updated = threading.Event()


class TaskMonitor:
    """One poller for every transfer task of a ``TransferClient``: each poll is one
    ``task_list`` request per :attr:`MAX_IDS` watched tasks (filtered by task id), not
    one ``get_task`` per task, so 96 sites polled every 2 s cost 1 request/s, not 48.
    """

    MAX_IDS = 50  # task ids per task_list filter (the Transfer API's documented cap)

    def __init__(self, tc: Any, requests_per_s: float) -> None:
        self.tc = tc
        self.budget = RequestBudget(requests_per_s)
        self.rate_chosen = False  # set by a store's transfer.requests_per_s
        self._watches: dict[str, _Watch] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self.polls = 0

    def watch(self, task_id: str, poll_s: float) -> _Watch:
        """Start following ``task_id``; its :class:`_Watch` is updated after every poll."""
        w = _Watch(poll_s)
        with self._lock:
            self._watches[task_id] = w
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, daemon=True,
                                                name="flwr-hpc-transfer-monitor")
                self._thread.start()
        self._wake.set()
        return w

    def unwatch(self, task_id: str) -> None:
        """Stop following ``task_id``."""
        with self._lock:
            self._watches.pop(task_id, None)

    def active(self) -> int:
        """Watched tasks not finished yet (ACTIVE, or not seen by a poll yet)."""
        with self._lock:
            return sum(1 for w in self._watches.values()
                       if w.doc is None or w.doc.get("status") == "ACTIVE")

    def _run(self) -> None:
        while True:
            with self._lock:
                watches = dict(self._watches)
                if not watches:
                    self._thread = None
                    return
            poll_s = min(w.poll_s for w in watches.values())
            ids = sorted(watches)
            for i in range(0, len(ids), self.MAX_IDS):
                chunk = ids[i:i + self.MAX_IDS]
                try:
                    docs = {str(d["task_id"]): dict(d) for d in _call(
                        self.budget, self.tc.task_list, filter={"task_id": chunk},
                        limit=len(chunk))}
                    error = None
                    error, fatal = None, False
                except Exception as err:  # noqa: BLE001 - the SDK already retried 429/5xx
                    docs, error = {}, explain(err)
                    # a login that cannot be used any more does not heal by waiting
                    fatal = (isinstance(err, GlobusServiceError)
                             or globus_auth.is_revoked_login(err))
                self.polls += 1
                for tid in chunk:
                    w = watches[tid]
                    if tid in docs:
                        w.doc, w.error = docs[tid], None
                    elif error:
                        w.error, w.fatal = error, fatal
                    w.updated.set()
            self._wake.wait(poll_s)
            self._wake.clear()


_monitors_lock = threading.Lock()
_monitors: dict[int, TaskMonitor] = {}


def task_monitor(tc: Any, requests_per_s: float | None = None) -> TaskMonitor:
    """The :class:`TaskMonitor` of ``tc`` (one per client, with the client's request
    budget: ``requests_per_s``, the lowest any of its stores asks for).
    """
    with _monitors_lock:
        mon = _monitors.get(id(tc))
        if mon is None or mon.tc is not tc:
            mon = _monitors[id(tc)] = TaskMonitor(
                tc, requests_per_s or TransferSettings.requests_per_s)
            mon.rate_chosen = requests_per_s is not None
        elif requests_per_s and (not mon.rate_chosen or requests_per_s < mon.budget.rate):
            mon.budget.rate, mon.budget.burst = requests_per_s, max(1, int(requests_per_s))
            mon.rate_chosen = True
        return mon


# ----------------------------------------------------------------------------- transfers


def run_transfer(tc: Any, *, source: str, destination: str,
                 items: list[tuple[str, str]], label: str, settings: TransferSettings,
                 site: str, direction: str) -> TransferReport:
    """Submit one transfer task with ``items`` and wait for it; raise :class:`TransferError`
    (the task cancelled first) on FAILED, INACTIVE, too many faults or the deadline.
    """
    import globus_sdk

    t0 = time.monotonic()
    # The service's deadline is a backstop (e.g. the server died): we cancel first, locally.
    deadline = dt.datetime.now(dt.UTC) + dt.timedelta(
        seconds=settings.deadline_s + max(60.0, 0.1 * settings.deadline_s))
    data = globus_sdk.TransferData(
        source, destination, label=safe_label(label), sync_level="checksum",
        verify_checksum=True, deadline=deadline.isoformat(timespec="seconds"),
        fail_on_quota_errors=True)
    for src, dst in items:
        data.add_item(src, dst)
    what = f"transfer {direction} ({len(items)} objects)"
    monitor = task_monitor(tc, settings.requests_per_s)
    try:
        data["submission_id"] = _call(monitor.budget, tc.get_submission_id)["value"]
    except Exception as err:  # noqa: BLE001
        raise TransferError(site, f"{what}: {explain(err)}") from None
    task_id = _submit(tc, data, site, what)
    log.info("site '%s': %s submitted as Transfer task %s", site, what, task_id)
    watch = monitor.watch(task_id, settings.poll_s)
    try:
        return _await(tc, watch, task_id, t0, what, site, settings)
    finally:
        monitor.unwatch(task_id)


def _await(tc: Any, watch: _Watch, task_id: str, t0: float, what: str, site: str,
           settings: TransferSettings) -> TransferReport:
    local_deadline = t0 + settings.deadline_s
    warned = None
    while True:
        watch.updated.wait(max(1.0, 4 * settings.poll_s))
        watch.updated.clear()
        doc = watch.doc
        if doc is None or watch.error:
            if watch.fatal:
                raise TransferError(site, f"{what}: {watch.error}", task_id)
            if time.monotonic() > local_deadline:
                _cancel(tc, task_id, site)
                raise TransferError(site, f"{what}: no status within transfer.deadline_s="
                                    f"{settings.deadline_s:g} s ({watch.error or 'not listed'})"
                                    "; the task was cancelled", task_id)
            if watch.error and watch.error != warned:
                log.warning("site '%s': polling Transfer task %s: %s", site, task_id,
                            watch.error)
                warned = watch.error
            if doc is None:
                continue
        status = doc.get("status")
        if status == "SUCCEEDED":
            return TransferReport(task_id, int(doc.get("files_transferred") or 0),
                                  int(doc.get("bytes_transferred") or 0),
                                  time.monotonic() - t0, status)
        if status == "FAILED":
            fatal = doc.get("fatal_error") or {}
            raise TransferError(
                site, f"{what} FAILED (task {task_id}): {fatal.get('code', '?')}: "
                f"{fatal.get('description', doc.get('nice_status') or 'no detail')}", task_id)
        if status == "INACTIVE":
            _cancel(tc, task_id, site)
            raise TransferError(
                site, f"{what} went INACTIVE (task {task_id}, {doc.get('nice_status')}): a "
                "collection's credentials expired or need consent; the task was cancelled. "
                "Renew the credentials (re-run 'globus session consent' or ask the "
                "collection's admin) and restart the run", task_id)
        faults = int(doc.get("faults") or 0)
        if faults > settings.max_faults:
            detail = _last_error(tc, task_id) or doc.get("nice_status") or "no detail"
            _cancel(tc, task_id, site)
            raise TransferError(
                site, f"{what}: {faults} faults (more than transfer.max_faults="
                f"{settings.max_faults}), last: {detail}; the task was cancelled", task_id)
        if time.monotonic() > local_deadline:
            _cancel(tc, task_id, site)
            raise TransferError(
                site, f"{what} did not finish within transfer.deadline_s="
                f"{settings.deadline_s:g} s (status {status}, {doc.get('nice_status')}, "
                f"{doc.get('bytes_transferred', 0)} bytes moved); the task was cancelled",
                task_id)


def _submit(tc: Any, data: Any, site: str, what: str) -> str:
    for attempt in range(1, SUBMIT_ATTEMPTS + 1):
        try:
            return str(_call(task_monitor(tc).budget, tc.submit_transfer, data)["task_id"])
        except Exception as err:  # noqa: BLE001
            import globus_sdk

            retriable = isinstance(err, globus_sdk.NetworkError) or (
                getattr(err, "http_status", 0) or 0) >= 500
            if not retriable or attempt == SUBMIT_ATTEMPTS:
                raise TransferError(site, f"{what}: {explain(err)}") from None
            # same submission_id: the service returns the first task, never a second one
            log.warning("site '%s': submitting %s failed (%s); retrying", site, what,
                        explain(err))
            time.sleep(min(2.0 * attempt, 10.0))
    raise AssertionError("unreachable")  # pragma: no cover


def _cancel(tc: Any, task_id: str, site: str) -> None:
    try:
        _call(task_monitor(tc).budget, tc.cancel_task, task_id)
    except Exception as err:  # noqa: BLE001 - already finished, or the service is down
        log.warning("site '%s': cancelling Transfer task %s: %s", site, task_id, explain(err))


def _last_error(tc: Any, task_id: str) -> str:
    try:
        for event in _call(task_monitor(tc).budget, tc.task_event_list, task_id, limit=10):
            if event.get("is_error"):
                return f"{event.get('code')}: {event.get('description') or event.get('details')}"
    except Exception:  # noqa: BLE001
        pass
    return ""


# ----------------------------------------------------------------------------- the store


class GlobusTransferStore(StoreDefaults):
    """The server's handle on one site's store, moved by Globus Transfer.

    ``put`` writes into the server's staging directory and marks the object pending;
    :meth:`flush` moves everything pending to the site in one transfer task. Objects of at
    most ``transfer.inline_max_bytes`` (a message's metadata, configs, the node's Context,
    small arrays) are not transferred: :meth:`attach` puts them inside the Compute task
    (at most :data:`INLINE_JOB_BYTES` per task; the rest of a phase's small objects go by
    Transfer), and the site worker writes them into its store, verified. :meth:`prestage`
    moves a new model to a busy site ahead of its next message. ``fetch`` moves reply
    objects the other way in one task. ``get`` reads (and verifies) the server's copy.
    Objects the site received during this run are remembered, so each crosses once.
    """

    def __init__(self, site: str, *, collection_id: str, collection_path: str,
                 site_path: str, settings: TransferSettings, client: Any = None) -> None:
        self.site = site
        self.collection_id = collection_id
        self.collection_path = collection_path
        self.site_path = site_path
        self.settings = settings
        self.local = FilesystemStore(Path(settings.path), site=f"{site}@server")
        self._client = client
        self._held: set[str] = set()
        self._pending: dict[str, int] = {}
        self._inflight: dict[str, Future[None]] = {}  # objects in a running transfer task
        self._small: OrderedDict[str, bytes] = OrderedDict()  # ride inside tasks (LRU)
        self._small_bytes = 0
        self._small_new: list[str] = []  # put since the last flush
        self._lock = threading.Lock()
        self.reports: list[TransferReport] = []

    def __repr__(self) -> str:
        """The store's site and the site's collection."""
        return f"GlobusTransferStore(site={self.site!r}, collection={self.collection_id})"

    @property
    def client(self) -> Any:
        """The ``TransferClient`` given at construction, else the process's shared one
        (built on first use, with ``data_access`` for both collections).
        """
        if self._client is None:
            self._client = transfer_client([self.settings.collection_id, self.collection_id])
        return self._client

    def spec(self) -> dict[str, Any]:
        """What the site worker opens: the store as files under ``site_path``."""
        return {"type": "globus-transfer", "path": self.site_path, "site": self.site}

    def has(self, object_id: str) -> bool:
        """Whether the object is at the site already, on its way, or will ride inline."""
        with self._lock:
            return (object_id in self._held or object_id in self._pending
                    or object_id in self._inflight or object_id in self._small)

    def put(self, object_id: str, data: ObjectData, *, trusted: bool = False) -> int:
        """Keep a small object for :meth:`attach`, or stage the object in the server's
        directory and mark it pending; return its size, or 0 if the site holds it or it is
        on its way already.
        """
        check_object_id(object_id)
        if self.has(object_id):
            return 0
        nbytes = data_len(data)
        if nbytes <= self.settings.inline_max_bytes:
            blob = join_parts(data)
            if not trusted:
                verify_object(object_id, blob, repr(self))
            with self._lock:
                self._small[object_id] = blob
                self._small_bytes += nbytes
                self._small_new.append(object_id)
                while self._small_bytes > SMALL_CACHE_BYTES and len(self._small) > 1:
                    _, old = self._small.popitem(last=False)
                    self._small_bytes -= len(old)
            return nbytes
        self.local.put(object_id, data, trusted=trusted)  # 0 if already staged
        with self._lock:
            self._pending[object_id] = nbytes
        return nbytes

    def _spill_small(self) -> None:
        """A phase's small objects past :data:`INLINE_JOB_BYTES` go by Transfer instead
        (largest first), so no task carries more than that inline.
        """
        with self._lock:
            new = [o for o in dict.fromkeys(self._small_new) if o in self._small]
            self._small_new.clear()
            total = sum(len(self._small[o]) for o in new)
            spill = []
            for oid in sorted(new, key=lambda o: -len(self._small[o])):
                if total <= INLINE_JOB_BYTES:
                    break
                total -= len(self._small[oid])
                spill.append((oid, self._small.pop(oid)))
                self._small_bytes -= len(spill[-1][1])
        for oid, blob in spill:
            self.local.put(oid, blob, trusted=True)
            with self._lock:
                self._pending[oid] = len(blob)

    def flush(self, label: str) -> TransferReport | None:
        """Move every pending object to the site in one transfer task, and wait for any
        transfer already carrying objects it would move (a pre-stage); what such a
        transfer failed to move is moved here.
        """
        self._spill_small()
        report = None
        for _attempt in range(2):
            with self._lock:
                batch = {o: n for o, n in self._pending.items() if o not in self._inflight}
                waits = {self._inflight[o] for o in self._pending if o in self._inflight}
                mine: Future[None] = Future()
                for oid in batch:
                    self._inflight[oid] = mine
            if batch:
                report = self._move(batch, mine, label)
            retry = False
            for fut in waits:
                try:
                    fut.result()
                except TransferError:
                    retry = True  # its objects are pending again: move them here
            if not retry:
                return report
        return report

    def _move(self, batch: dict[str, int], fut: Future[None], label: str,
              direction: str = "to the site") -> TransferReport:
        items = [(_object_path(self.settings.collection_path, oid),
                  _object_path(self.collection_path, oid)) for oid in sorted(batch)]
        try:
            report = run_transfer(self.client, source=self.settings.collection_id,
                                  destination=self.collection_id, items=items,
                                  label=f"{label} to {self.site}", settings=self.settings,
                                  site=self.site, direction=direction)
        except BaseException as err:
            with self._lock:
                for oid in batch:
                    self._inflight.pop(oid, None)
            fut.set_exception(err)
            raise
        with self._lock:
            self._held.update(batch)
            for oid in batch:
                self._pending.pop(oid, None)
                self._inflight.pop(oid, None)
        fut.set_result(None)
        self.reports.append(report)
        return report

    def prestage(self, objects: Mapping[str, ObjectData], label: str) -> TransferReport | None:
        """Move the objects the site lacks (those too large to ride inline) ahead of the
        message that will need them -- a new global model, while the site still runs an
        earlier task. Skipped (None) when ``transfer.prestage`` is off, when there is
        nothing to move, or when the process's transfer tasks would leave no slot under
        Transfer's active-task limit for urgent transfers (at most ``max_active_tasks - 1``
        active, counting this one). A failed pre-stage is logged; the objects are moved
        again when a message needs them.
        """
        if not self.settings.prestage:
            return None
        need = {o: d for o, d in objects.items()
                if data_len(d) > self.settings.inline_max_bytes and not self.has(o)}
        if not need:
            return None
        if task_monitor(self.client, self.settings.requests_per_s).active() >= max(
                1, self.settings.max_active_tasks - 1):
            log.debug("site '%s': no pre-stage, Transfer's active tasks are taken", self.site)
            return None
        for oid, data in need.items():
            self.local.put(oid, data, trusted=True)
        with self._lock:
            batch = {o: data_len(d) for o, d in need.items()
                     if o not in self._held and o not in self._inflight}
            self._pending.update(batch)
            mine: Future[None] = Future()
            for oid in batch:
                self._inflight[oid] = mine
        if not batch:
            return None
        try:
            return self._move(batch, mine, f"{label} pre-stage", "to the site (pre-stage)")
        except TransferError as err:
            log.warning("site '%s': pre-staging failed (%s); the objects will be moved when "
                        "needed", self.site, err)
            return None

    def attach(self, job: dict[str, Any], object_ids: list[str]) -> None:
        """Put the small objects of ``object_ids`` inside the task (``job["objects"]``);
        the site worker writes them into its store, verified.
        """
        with self._lock:
            small = {o: self._small[o] for o in object_ids
                     if o in self._small and o not in self._held}
        if small:
            job["objects"] = encode(small)

    def fetch(self, object_ids: Iterable[str], label: str) -> TransferReport | None:
        """Move the objects the server lacks from the site in one transfer task."""
        need = sorted({check_object_id(o) for o in object_ids} - self._held)
        need = [o for o in need if not self.local.has(o)]
        if not need:
            return None
        items = [(_object_path(self.collection_path, oid),
                  _object_path(self.settings.collection_path, oid)) for oid in need]
        report = run_transfer(self.client, source=self.collection_id,
                              destination=self.settings.collection_id, items=items,
                              label=f"{label} from {self.site}", settings=self.settings,
                              site=self.site, direction="from the site")
        self.reports.append(report)  # Transfer verified checksums; get() verifies sha256
        with self._lock:
            self._held.update(need)  # the site holds its own replies
        return report

    batch_fetch = True  # one transfer per site for all its replies of a phase

    def receive(self, result: dict[str, Any], object_ids: list[str], label: str) -> None:
        """:meth:`fetch` ``object_ids`` from the site."""
        self.fetch(object_ids, label)  # nothing to move when the batch already has them

    def reply_size(self, object_id: str) -> int | None:
        """The size of the server's copy, or None if it was not fetched."""
        return self.local.reply_size(object_id)

    def get(self, object_id: str) -> bytes:
        """The verified bytes of the server's copy; raises :class:`PayloadMissingError`
        if it was not fetched from the site yet.
        """
        try:
            return self.local.get(object_id)
        except PayloadMissingError:
            raise PayloadMissingError(object_id, f"{self!r}: not fetched from the site "
                                      "yet") from None
