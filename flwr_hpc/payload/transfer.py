"""The ``globus-transfer`` payload store: server-orchestrated third-party Globus Transfer.

The server writes objects into its own staging directory, which is exposed by a Globus
collection (``transfer.collection_id`` / ``collection_path``; ``transfer.path`` is the same
directory as the server process sees it). For every site and every direction of a phase it
submits **one** transfer task that carries every object the site lacks (or every reply
object the server lacks), from collection to collection, so sites need no Transfer
credentials and compute nodes never need a network path to the server. The worker at the
site reads and writes the same store as plain files (``payload.path``), exactly like the
``shared-fs`` store.

Objects up to ``transfer.inline_max_bytes`` do not need a transfer: they ride inside the
Compute task (:meth:`GlobusTransferStore.attach`). A new model is pre-staged to sites
still busy with an earlier message (:meth:`GlobusTransferStore.prestage`). Transfer tasks
themselves -- checksums, deadlines, fault watching, one batched poller and a request budget
for all sites -- are :mod:`flwr_hpc.payload.transfer_tasks`; this module adds the
collections (``data_access`` scopes for non-high-assurance GCSv5 *mapped* collections only:
on guest collections that scope is an "Unknown Scope" error) and the store.

Credentials (:mod:`flwr_hpc.globus_auth`): the confidential client of
``GLOBUS_COMPUTE_CLIENT_ID`` / ``GLOBUS_COMPUTE_CLIENT_SECRET`` (each collection must grant
``<client id>@clients.auth.globus.org`` access), else the user's ``flwr-hpc login``
(refreshed as needed; a run never prompts); never logged.

One cohesive thing (over 400 lines): the store's staging half (pending, in-flight, inline
and pre-staged objects share one lock and one set of states) and its fetching half.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from flwr_hpc import globus_auth
from flwr_hpc.errors import GlobusServiceError, PayloadIntegrityError, PayloadMissingError
from flwr_hpc.globus_auth import ENV_CLIENT_ID, ENV_CLIENT_SECRET
from flwr_hpc.payload.inline import decode, encode
from flwr_hpc.payload.objects import (
    ObjectData,
    check_object_id,
    data_len,
    join_parts,
    verify_object,
)
from flwr_hpc.payload.store import FilesystemStore, StoreDefaults
from flwr_hpc.payload.transfer_tasks import (
    TransferError,
    TransferReport,
    TransferSettings,
    budgeted_call,
    explain,
    run_transfer,
    safe_label,
    task_monitor,
)

__all__ = ["ENV_CLIENT_ID", "ENV_CLIENT_SECRET", "GlobusServiceError", "GlobusTransferStore",
           "TransferError", "TransferReport", "TransferSettings", "explain", "safe_label",
           "set_transfer_client", "transfer_client"]

log = logging.getLogger(__name__)

INLINE_JOB_BYTES = 2 * 1024 * 1024  # small objects one phase puts inside a site's tasks
SMALL_CACHE_BYTES = 64 * 1024 * 1024  # small objects kept for later tasks (LRU)
FLUSH_ATTEMPTS = 4  # a flush moves what failed pre-stages left, at most this often

_tc_lock = threading.Lock()
_tc: Any = None
_checked_collections: dict[str, bool] = {}  # collection id -> needs data_access


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
                doc = budgeted_call(task_monitor(tc).budget, tc.get_endpoint, coll)
            except Exception as err:  # noqa: BLE001
                raise TransferError(None, f"collection {coll}: {explain(err)}") from None
            needs = globus_auth.needs_data_access(doc)
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


def _object_path(root: str, object_id: str) -> str:
    oid = check_object_id(object_id)
    return f"{root.rstrip('/')}/objects/{oid[:2]}/{oid}"


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
        return {"type": "globus-transfer", "path": self.site_path, "site": self.site,
                "inline_max_bytes": self.settings.inline_max_bytes}

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
                if object_id in self._small:  # another thread put it meanwhile
                    return 0
                self._small[object_id] = blob
                self._small_bytes += nbytes
                self._small_new.append(object_id)
                # forget small objects of earlier phases first (a later phase that needs
                # one puts it again: has() is False once it is gone); never this phase's
                protected = set(self._small_new)
                for oid in list(self._small):
                    if self._small_bytes <= SMALL_CACHE_BYTES:
                        break
                    if oid not in protected:
                        self._small_bytes -= len(self._small.pop(oid))
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
        for attempt in range(FLUSH_ATTEMPTS):
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
                except TransferError as err:
                    retry = True  # its objects are pending again: move them here
                    last = err
            if not retry:
                return report
            log.info("site '%s': a pre-stage failed (%s); moving its objects now (attempt "
                     "%d)", self.site, last, attempt + 1)
        raise TransferError(self.site, f"objects for '{label}' could not be moved to the "
                            f"site after {FLUSH_ATTEMPTS} attempts")

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
        earlier task. Skipped (None) when ``transfer.prestage`` is off (the default: only
        for strategies that send one global model to every site), when there is nothing
        to move, or when no slot is free under Transfer's active-task limit with one kept
        for urgent transfers (active and reserved pre-stages below
        ``max_active_tasks - 1``, taken atomically). A failed pre-stage is logged; the
        objects are moved again when a message needs them.
        """
        if not self.settings.prestage:
            return None
        need = {o: d for o, d in objects.items()
                if data_len(d) > self.settings.inline_max_bytes and not self.has(o)}
        if not need:
            return None
        monitor = task_monitor(self.client, self.settings.requests_per_s)
        if not monitor.reserve(max(1, self.settings.max_active_tasks - 1)):
            log.debug("site '%s': no pre-stage, Transfer's active tasks are taken", self.site)
            return None
        try:
            return self._prestage(need, label)
        finally:
            monitor.release()

    def _prestage(self, need: Mapping[str, ObjectData], label: str) -> TransferReport | None:
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
            lost = [o for o in object_ids if o not in small and o not in self._held]
        if lost:  # never a task without its objects
            raise PayloadMissingError(lost[0], f"{self!r}: neither at the site nor carried "
                                      f"by the task ({len(lost)} object(s))")
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
        """Keep the small objects ``result`` carries (verified), then :meth:`fetch` the
        rest of ``object_ids`` from the site (nothing to move when the batch or the
        result already brought them).
        """
        wanted = set(object_ids)
        for oid, data in decode(result.get("objects") or {}).items():
            if oid not in wanted:
                continue  # only what a task said it wrote
            try:
                self.local.put(oid, data)  # verified: a changed object is refused
            except PayloadIntegrityError as err:
                log.warning("site '%s': %s; fetching it by Transfer instead", self.site, err)
        self.fetch(object_ids, label)

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
