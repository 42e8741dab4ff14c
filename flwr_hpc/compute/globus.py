"""Globus Compute backend: one ``globus_compute_sdk.Executor`` per site endpoint.

What the SDK does not do, this backend does (see the Globus reference sheet):

* **One authenticated client** for all sites (:func:`shared_client`): headless with
  ``GLOBUS_COMPUTE_CLIENT_ID`` / ``GLOBUS_COMPUTE_CLIENT_SECRET``, else the user's
  ``flwr-hpc login`` (:mod:`flwr_hpc.globus_auth`, shared with Transfer), else the SDK's
  token store after ``globus-compute-endpoint login``; never an interactive login unless
  asked.
* **No burst throttle delay**: the Executor's client-side throttle (4 small batches per 16 s,
  then ~4 s sleeps) is relaxed to 8 per 1 s, so a round's submissions go out at once.
* **JSON only**: arguments and results are ``JSONData``; the Executor's serializer refuses
  any other result format, so nothing is unpickled from the wire.
* **Poisoned executors are rebuilt**: after any submit error (e.g. the service's
  ``TASK_PAYLOAD_TOO_LARGE``) an Executor refuses all later work; the backend notices, fails
  only the affected task, and builds a fresh Executor for the next one.
* **Liveness**: :meth:`status` asks the service for the endpoint's status (cached for a few
  seconds), so the grid reports an offline endpoint's nodes ``NODE_UNAVAILABLE`` instead
  of waiting for futures that would stay pending for the task TTL (two weeks).
* Deadlines and late results are the grid's: there is no remote cancel in Globus Compute.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from typing_extensions import override

from flwr_hpc import globus_auth
from flwr_hpc.compute.base import ComputeBackend
from flwr_hpc.errors import FlwrHpcError, GlobusServiceError
from flwr_hpc.globus_auth import ENV_CLIENT_ID, ENV_CLIENT_SECRET
from flwr_hpc.protocol import RESULT_SERIALIZERS

log = logging.getLogger(__name__)

STATUS_TTL_S = 10.0

_client_lock = threading.Lock()
_client: Any = None


def credentials_available(environ: dict[str, str] | None = None) -> bool:
    """Whether a client can be built without a prompt: the confidential-client variables
    are set in ``environ`` (default: this process's), ``flwr-hpc login`` stored a login, or
    the Compute SDK's token store holds a usable one (``globus-compute-endpoint login``).
    """
    env = os.environ if environ is None else environ
    if globus_auth.confidential_credentials(env):
        return True
    if globus_auth.has_user_login():
        return True
    token_store = Path(env.get("GLOBUS_COMPUTE_USER_DIR") or Path.home() / ".globus_compute")
    return _stored_login_usable(token_store / "storage.db")


def _stored_login_usable(path: Path) -> bool:
    """The SDK's token store holds a login that works without a prompt: a refresh token
    or an access token that is still valid. A stale or empty ``storage.db`` does not count
    (the SDK would fall into an interactive login instead of naming what is missing).
    """
    if not path.is_file():
        return False
    try:
        from globus_compute_sdk.sdk.auth.token_storage import get_token_storage

        storage = get_token_storage()
        try:
            tokens = storage.get_token_data_by_resource_server()
        finally:
            storage.close()
    except Exception:  # noqa: BLE001 - an unreadable store is no login
        return False
    now = time.time()
    return any(t.refresh_token or (t.expires_at_seconds or 0) > now + 60
               for t in tokens.values())


def shared_client(*, interactive: bool = False):
    """The process's one ``globus_compute_sdk.Client`` (built on first use)."""
    global _client
    with _client_lock:
        if _client is None:
            if not interactive and not credentials_available():
                raise GlobusServiceError(
                    None, "no Globus credentials: run 'flwr-hpc login' once (your own "
                    f"Globus identity), or set {ENV_CLIENT_ID} and {ENV_CLIENT_SECRET} (a "
                    "confidential client), or run 'globus-compute-endpoint login' once on "
                    "this machine (the token store holds no usable login)")
            from globus_compute_sdk import Client

            # a confidential client in the environment: the SDK builds its ClientApp; else
            # the user's flwr-hpc login (one for Compute and Transfer); else the SDK's own
            try:
                if (not globus_auth.confidential_credentials()
                        and globus_auth.has_user_login()):
                    _client = Client(app=globus_auth.shared_user_app())
                else:
                    _client = Client()
            except GlobusServiceError:
                raise
            except Exception as err:  # noqa: BLE001 - 401s, network errors: say what failed
                hint = ""
                if getattr(err, "http_status", None) in (401, 403):
                    hint = (f" -- the credentials were refused: check {ENV_CLIENT_ID} / "
                            f"{ENV_CLIENT_SECRET}, or log in again")
                raise GlobusServiceError(None, "could not create the Globus "
                                         f"Compute client: {type(err).__name__}: {err}{hint}"
                                         ) from None
        return _client


def set_shared_client(client: Any) -> None:
    """Use ``client`` for every site (tests, or a client built by the caller)."""
    global _client
    with _client_lock:
        _client = client


def result_serializer():
    """Arguments as JSON, and results accepted *only* as JSON."""
    from globus_compute_sdk.serialize import ComputeSerializer, DillCode, JSONData

    return ComputeSerializer(strategy_data=JSONData(),
                             allowed_deserializer_types=[JSONData, DillCode])


class GlobusComputeBackend(ComputeBackend):
    """One site backed by a Globus Compute endpoint (``endpoint_id``), through one
    ``Executor`` that is rebuilt after a submit error poisons it.
    """

    def __init__(self, site: str, endpoint_id: str, *,
                 resource_specification: dict[str, Any] | None = None,
                 user_endpoint_config: dict[str, Any] | None = None,
                 amqp_port: int | None = None, client: Any = None) -> None:
        super().__init__(site)
        self.endpoint_id = endpoint_id
        self.resource_specification = dict(resource_specification or {}) or None
        self.user_endpoint_config = dict(user_endpoint_config or {}) or None
        self.amqp_port = amqp_port
        self._client = client
        self._lock = threading.Lock()
        self._executor: Any = None
        self._closed = False
        self._status: tuple[float, str] | None = None
        self.rebuilds = 0

    # -- executor lifecycle
    def _new_executor(self):
        from globus_compute_sdk import Executor

        return Executor(
            endpoint_id=self.endpoint_id, client=self._client or shared_client(),
            resource_specification=self.resource_specification,
            user_endpoint_config=self.user_endpoint_config, amqp_port=self.amqp_port,
            api_burst_limit=8, api_burst_window_s=1,  # no multi-second client-side sleeps
            serializer=result_serializer(), result_serializers=RESULT_SERIALIZERS,
            label=f"flwr-hpc:{self.site}")

    def _current_executor(self):
        with self._lock:
            if self._closed:
                raise RuntimeError(f"backend for site '{self.site}' is closed")
            ex = self._executor
            if ex is not None and getattr(ex, "_stopped_in_error", False):
                log.warning("site '%s': the Globus Compute Executor stopped after a submit "
                            "error; building a new one", self.site)
                try:
                    ex.shutdown(wait=False, cancel_futures=True)
                except Exception:  # noqa: BLE001
                    pass
                ex, self.rebuilds = None, self.rebuilds + 1
            if ex is None:
                ex = self._executor = self._new_executor()
            return ex

    # -- ComputeBackend
    @override
    def start(self, fn: Callable[[dict], dict], job: dict[str, Any]) -> Future:
        executor = self._current_executor()
        try:
            return executor.submit(fn, job)
        except RuntimeError:  # poisoned between our check and the submit: one retry
            return self._current_executor().submit(fn, job)

    def failure(self, exc: BaseException) -> FlwrHpcError:
        """The service refused the task as too large, else lost worker / remote error."""
        code = getattr(exc, "code", None)
        if code == "TASK_PAYLOAD_TOO_LARGE" or getattr(exc, "http_status", None) == 413:
            return GlobusServiceError(
                self.site, "the task is larger than Globus Compute's 10 MB submit limit "
                "(TASK_PAYLOAD_TOO_LARGE); use a payload store instead of inline data")
        return super().failure(exc)

    @override
    def status(self) -> str:
        now = time.monotonic()
        if self._status and now - self._status[0] < STATUS_TTL_S:
            return self._status[1]
        try:
            client = self._client or shared_client()
            answer = client.get_endpoint_status(self.endpoint_id)
            status = str(answer.get("status", "unknown"))
        except GlobusServiceError:
            raise
        except Exception as err:  # noqa: BLE001 - treat as unknown, keep going
            log.warning("site '%s': endpoint status unavailable: %s", self.site, err)
            status = "unknown"
        self._status = (now, status)
        return status

    @override
    def close(self) -> None:
        with self._lock:
            self._closed = True
            ex, self._executor = self._executor, None
        if ex is not None:
            try:
                ex.shutdown(wait=False, cancel_futures=True)
            except Exception as err:  # noqa: BLE001
                log.debug("executor shutdown for %s: %s", self.site, err)
