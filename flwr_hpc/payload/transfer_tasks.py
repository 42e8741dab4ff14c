"""Globus Transfer tasks: submitting one, watching it, staying within the request budget.

What the Transfer service does not do, done here (see the Globus reference sheet):

* ``sync_level="checksum"`` + ``verify_checksum=True`` (the reader still verifies the
  sha256 of every object);
* an explicit ``deadline`` on every task, a local deadline too, ``faults`` watched while the
  task stays ACTIVE (a missing source is retried silently until the deadline) and the task
  cancelled past ``max_faults``;
* FAILED, INACTIVE, ``ConsentRequired`` and refused logins turned into errors that say what
  to do;
* the ``submission_id`` fetched first and kept, so a resubmit after a network error cannot
  create a second task;
* **many sites**: one :class:`TaskMonitor` per client polls every watched task with one
  ``task_list`` request per 50 task ids (not one ``get_task`` loop per site), and every
  request passes the client's :class:`RequestBudget` (``transfer.requests_per_s``: 10/s in
  bursts of 10 by default, half of the ~20 requests/s per user the service meters over
  10 s), so 96 sites stay within the service's limits.

The store that uses them is :mod:`flwr_hpc.payload.transfer`.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import threading
import time
from dataclasses import dataclass
from typing import Any, cast

from flwr_hpc import globus_auth
from flwr_hpc.errors import GlobusServiceError
from flwr_hpc.globus_auth import ENV_CLIENT_ID, ENV_CLIENT_SECRET

log = logging.getLogger("flwr_hpc.payload.transfer")

SUBMIT_ATTEMPTS = 3
_LABEL_BAD = re.compile(r"[^A-Za-z0-9 _,.-]")


class TransferError(GlobusServiceError):
    """A transfer task failed, stalled, expired or could not be submitted."""

    def __init__(self, site: str | None, problem: str, task_id: str | None = None) -> None:
        super().__init__(site, problem)
        self.task_id = task_id


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
    prestage: bool = False
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


def budgeted_call(budget: RequestBudget, fn: Any, *args: Any, **kwargs: Any) -> Any:
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
        self._reserved = 0  # slots taken by optional transfers not watched yet
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

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
            return self._active()

    def _active(self) -> int:
        return sum(1 for w in self._watches.values()
                   if w.doc is None or w.doc.get("status") == "ACTIVE")

    def reserve(self, limit: int) -> bool:
        """Take a slot for an optional transfer (a pre-stage) if fewer than ``limit``
        tasks are active or reserved; :meth:`release` it when that transfer is over.
        """
        with self._lock:
            if self._active() + self._reserved >= limit:
                return False
            self._reserved += 1
            return True

    def release(self) -> None:
        """Give back a slot taken with :meth:`reserve`."""
        with self._lock:
            self._reserved = max(0, self._reserved - 1)

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
                    docs = {str(d["task_id"]): dict(d) for d in budgeted_call(
                        self.budget, self.tc.task_list, filter={"task_id": chunk},
                        limit=len(chunk))}
                    error = None
                    error, fatal = None, False
                except Exception as err:  # noqa: BLE001 - the SDK already retried 429/5xx
                    docs, error = {}, explain(err)
                    # a login that cannot be used any more does not heal by waiting
                    fatal = (isinstance(err, GlobusServiceError)
                             or globus_auth.is_revoked_login(err))
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
        data["submission_id"] = budgeted_call(monitor.budget, tc.get_submission_id)["value"]
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
            budget = task_monitor(tc).budget
            return str(budgeted_call(budget, tc.submit_transfer, data)["task_id"])
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
        budgeted_call(task_monitor(tc).budget, tc.cancel_task, task_id)
    except Exception as err:  # noqa: BLE001 - already finished, or the service is down
        log.warning("site '%s': cancelling Transfer task %s: %s", site, task_id, explain(err))


def _last_error(tc: Any, task_id: str) -> str:
    try:
        budget = task_monitor(tc).budget
        for event in budgeted_call(budget, tc.task_event_list, task_id, limit=10):
            if event.get("is_error"):
                return f"{event.get('code')}: {event.get('description') or event.get('details')}"
    except Exception:  # noqa: BLE001
        pass
    return ""
