"""Who flwr-hpc is when it talks to Globus Compute and Globus Transfer.

Two identities, tried in this order (shared by the server side and the payload plane; it
imports only :mod:`flwr_hpc.errors` and, lazily, ``globus_sdk``):

1. **A confidential client** (``GLOBUS_COMPUTE_CLIENT_ID`` / ``GLOBUS_COMPUTE_CLIENT_SECRET``
   in the environment): headless runs; one identity for Compute and Transfer, which every
   collection must grant (``<client id>@clients.auth.globus.org``).
2. **A user login**, made once with ``flwr-hpc login``: ``globus_sdk.UserApp`` (the native-app
   flow with PKCE; no client secret) whose refresh tokens are kept in
   ``$FLWR_HOME/hpc/globus/tokens.db`` (the SDK's ``SQLiteTokenStorage``: the file is the
   user's only, its directory too; several runs may refresh at once). The login asks for
   Compute (``ComputeScopes.all``) and Transfer (``TransferScopes.all``), plus the
   ``data_access`` scope of every non-high-assurance GCSv5 *mapped* collection the
   federation names (asked for only there: on guest collections it is an "Unknown Scope").
   Expired access tokens are refreshed by the SDK. A run never prompts: a missing login, a
   missing scope or a revoked refresh token is an error that names ``flwr-hpc login``.

The native client is the public one ``globus-compute-endpoint login`` uses (so a user needs
no app registration); ``FLWR_HPC_GLOBUS_CLIENT_ID`` names another native client. Tokens are
never logged, printed or put in an error message.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from flwr_hpc.errors import GlobusServiceError

ENV_CLIENT_ID = "GLOBUS_COMPUTE_CLIENT_ID"
ENV_CLIENT_SECRET = "GLOBUS_COMPUTE_CLIENT_SECRET"
ENV_NATIVE_CLIENT_ID = "FLWR_HPC_GLOBUS_CLIENT_ID"
# globus-compute-sdk's public native app (globus_compute_sdk.sdk.auth.globus_app)
DEFAULT_NATIVE_CLIENT_ID = "4cf29807-cf21-49ec-9443-ff9a3fb9f81c"
APP_NAME = "flwr-hpc"
TRANSFER_RS = "transfer.api.globus.org"
LOGIN_HINT = "run 'flwr-hpc login' (or set GLOBUS_COMPUTE_CLIENT_ID/_SECRET for a " \
             "confidential client)"

_lock = threading.Lock()
_apps: dict[str, Any] = {}  # token file -> the process's non-interactive UserApp


class LoginRequired(GlobusServiceError):
    """The user login is missing, lacks a scope, or can no longer be refreshed."""

    def __init__(self, problem: str) -> None:
        super().__init__(None, f"{problem}: {LOGIN_HINT}")


def token_file(home: str | Path | None = None) -> Path:
    """Where ``flwr-hpc login`` keeps its tokens: ``<FLWR_HOME>/hpc/globus/tokens.db``."""
    if home is None:
        from flwr.common.config import get_flwr_home

        home = get_flwr_home()
    return Path(home) / "hpc" / "globus" / "tokens.db"


def confidential_credentials(environ: Mapping[str, str] | None = None) -> tuple[str, str] | None:
    """The confidential client's id and secret from the environment, or None."""
    env = os.environ if environ is None else environ
    cid, secret = env.get(ENV_CLIENT_ID), env.get(ENV_CLIENT_SECRET)
    return (cid, secret) if cid and secret else None


def native_client_id(environ: Mapping[str, str] | None = None) -> str:
    """The native app the user logs in through."""
    env = os.environ if environ is None else environ
    return env.get(ENV_NATIVE_CLIENT_ID) or DEFAULT_NATIVE_CLIENT_ID


def has_user_login(path: Path | None = None) -> bool:
    """Whether ``flwr-hpc login`` stored a refreshable login (no network, no validation:
    a revoked token shows when it is used).
    """
    path = path or token_file()
    if not path.is_file():
        return False
    storage = _storage(path)
    try:
        tokens = storage.get_token_data_by_resource_server()
    except Exception:  # noqa: BLE001 - an unreadable store is no login
        return False
    finally:
        storage.close()
    return any(t.refresh_token for t in tokens.values())


def _storage(path: Path) -> Any:
    """The SDK's SQLite token storage, usable from every thread of the process: the
    Compute client, the staging threads and the Transfer poller share one app, and a
    refresh may happen on any of them (SQLite refuses a connection used from another
    thread unless told otherwise; calls are serialised by a lock).
    """
    from globus_sdk.token_storage import SQLiteTokenStorage

    class ThreadSafeSQLiteTokenStorage(SQLiteTokenStorage):
        def __init__(self, filepath: Path) -> None:
            self._lock = threading.RLock()
            super().__init__(filepath, connect_params={"check_same_thread": False})

        def store_token_data_by_resource_server(self, data: Any) -> None:
            with self._lock:
                super().store_token_data_by_resource_server(data)

        def get_token_data_by_resource_server(self) -> Any:
            with self._lock:
                return super().get_token_data_by_resource_server()

        def get_token_data(self, resource_server: str) -> Any:
            with self._lock:
                return super().get_token_data(resource_server)

        def remove_token_data(self, resource_server: str) -> bool:
            with self._lock:
                return bool(super().remove_token_data(resource_server))

        def close(self) -> None:
            with self._lock:
                super().close()

    path.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    return ThreadSafeSQLiteTokenStorage(path)


def _no_prompt_manager() -> Any:
    from globus_sdk.login_flows import LoginFlowManager

    class NoPrompt(LoginFlowManager):
        """A run's login flow: never prompts, says how to log in."""

        @classmethod
        def for_globus_app(cls, app_name: str, config: Any, login_client: Any) -> NoPrompt:
            return cls(login_client, request_refresh_tokens=True)

        def run_login_flow(self, auth_parameters: Any) -> Any:
            scopes = " ".join(auth_parameters.required_scopes or [])
            raise LoginRequired(f"the Globus login has no usable token for {scopes or 'a'} "
                                "scope (never logged in, a scope added since, or a "
                                "refresh token revoked)")

    return NoPrompt


def user_app(*, interactive: bool = False, path: Path | None = None,
             login_flow_manager: Any = None) -> Any:
    """A ``globus_sdk.UserApp`` on the flwr-hpc token store that needs Compute and Transfer.

    ``interactive``: a login flow prints a URL and reads the code from stdin (``flwr-hpc
    login``); otherwise any login flow raises :class:`LoginRequired` (runs never prompt).
    ``login_flow_manager`` overrides the flow (e.g. the SDK's local-server flow).
    """
    import globus_sdk
    from globus_sdk.scopes import ComputeScopes, TransferScopes

    path = path or token_file()
    if login_flow_manager is None:
        login_flow_manager = "command-line" if interactive else _no_prompt_manager()
    config = globus_sdk.GlobusAppConfig(
        token_storage=_storage(path), request_refresh_tokens=True,
        login_flow_manager=login_flow_manager)
    return globus_sdk.UserApp(
        APP_NAME, client_id=native_client_id(), config=config,
        scope_requirements={TRANSFER_RS: [TransferScopes.all],
                            ComputeScopes.resource_server: [ComputeScopes.all]})


def shared_user_app() -> Any:
    """The process's non-interactive :func:`user_app` (Compute and Transfer share it)."""
    if not has_user_login():
        raise LoginRequired("no Globus login in " + str(token_file()))
    key = str(token_file())
    with _lock:
        if key not in _apps:
            _apps[key] = user_app()
        return _apps[key]


def forget_apps() -> None:
    """Drop the cached apps (tests; after ``flwr-hpc login`` changed the store)."""
    with _lock:
        for app in _apps.values():
            try:
                app.close()
            except Exception:  # noqa: BLE001
                pass
        _apps.clear()


def needs_data_access(doc: Mapping[str, Any] | Any) -> bool:
    """Whether a collection (its ``get_endpoint`` document) needs a ``data_access`` scope:
    a GCSv5 mapped collection that is not high assurance.
    """
    return doc.get("entity_type") == "GCSv5_mapped_collection" and not doc.get("high_assurance")


def login(collections: Iterable[str] = (), *, force: bool = False,
          path: Path | None = None, login_flow_manager: Any = None,
          say: Callable[[str], None] = print) -> dict[str, Any]:
    """Log the user in (``flwr-hpc login``) and return what was stored.

    First the Compute and Transfer scopes; then each of ``collections`` is looked up with
    the new Transfer token, and if any is a mapped collection that needs ``data_access``,
    a second flow asks for exactly those consents. Returns ``{"token_file", "identity_id",
    "resource_servers", "data_access"}`` (no token).
    """
    import globus_sdk

    path = path or token_file()
    forget_apps()
    app = user_app(interactive=True, path=path, login_flow_manager=login_flow_manager)
    try:
        app.login(force=force)
        mapped: list[str] = []
        collections = list(dict.fromkeys(c for c in collections if c))
        if collections:
            tc = globus_sdk.TransferClient(app=app)
            for coll in collections:
                try:
                    doc = tc.get_endpoint(coll)
                except globus_sdk.GlobusAPIError as err:
                    raise GlobusServiceError(None, f"collection {coll}: {err.code} (HTTP "
                                             f"{err.http_status}): {err.message}") from None
                if needs_data_access(doc):
                    mapped.append(coll)
            if mapped:
                tc.add_app_data_access_scope(mapped)
                if app.login_required():
                    say(f"Collections {', '.join(mapped)} need your consent to access "
                        "their data (data_access); log in once more:")
                    app.login()
        stored = app.token_storage.get_token_data_by_resource_server()
        return {"token_file": str(path), "identity_id": app.token_storage.identity_id,
                "resource_servers": sorted(stored), "data_access": mapped}
    finally:
        app.close()


def logout(path: Path | None = None) -> tuple[int, int]:
    """``flwr-hpc logout``: revoke the stored tokens at Globus Auth and remove them.
    Returns (resource servers whose tokens were removed, tokens Auth could not revoke --
    still valid there until they expire; removed here all the same). (0, 0): no login.
    """
    path = path or token_file()
    if not path.is_file():
        return 0, 0
    forget_apps()
    app = user_app(path=path)
    try:
        storage = app.token_storage.token_storage
        stored = storage.get_token_data_by_resource_server()
        failed = 0
        for data in stored.values():
            for token in (data.access_token, data.refresh_token):
                if not token:
                    continue
                try:
                    app._login_client.oauth2_revoke_token(token)  # the app's own client
                except Exception:  # noqa: BLE001 - offline Auth: still removed here
                    failed += 1
            storage.remove_token_data(data.resource_server)
        return len(stored), failed
    finally:
        app.close()


def is_revoked_login(err: BaseException) -> bool:
    """Whether ``err`` is Globus Auth refusing a refresh token (``invalid_grant``)."""
    try:
        import globus_sdk
    except ImportError:  # pragma: no cover
        return False
    if not isinstance(err, globus_sdk.AuthAPIError):
        return False
    body = getattr(err, "raw_json", None) or {}
    return "invalid_grant" in (str(body.get("error", "")), str(err.code))
