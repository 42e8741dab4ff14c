"""Human Globus logins (``flwr-hpc login``) against an offline fake of Globus Auth.

Real: ``globus_sdk.UserApp`` with its native-app flow (PKCE), ID-token check, validating
SQLite token storage and refresh-token authorizer; ``TransferClient``; the Compute
``Client``. Faked: the HTTP edges of Auth (tests/fake_auth.py), Transfer and Compute. The
user's browser is ``FakeGlobusAuth.approve`` on the URL the SDK prints.
"""

from __future__ import annotations

import logging
import re
import stat
import textwrap
from urllib.parse import unquote

import pytest
from fake_auth import FakeGlobusAuth
from helpers import read_tasks, transfer_federation

from flwr_hpc import globus_auth
from flwr_hpc.payload import transfer as gt


@pytest.fixture
def auth(rsps, flwr_home, monkeypatch):
    """Globus Auth, faked; no confidential client in the environment; no cached apps."""
    fake = FakeGlobusAuth()
    fake.install(rsps)
    for var in (globus_auth.ENV_CLIENT_ID, globus_auth.ENV_CLIENT_SECRET):
        monkeypatch.delenv(var, raising=False)
    globus_auth.forget_apps()
    yield fake
    globus_auth.forget_apps()


@pytest.fixture
def browser(auth, monkeypatch, capsys):
    """The user: reads the URL the login flow printed, approves it, pastes the code."""
    urls: list[str] = []

    def answer(prompt: str = "") -> str:
        out = capsys.readouterr().out
        url = re.search(r"https://auth\.globus\.org/v2/oauth2/authorize\S+", out)
        assert url, f"no authorize URL printed before {prompt!r}: {out!r}"
        urls.append(unquote(url.group(0)))
        return auth.approve(url.group(0))

    monkeypatch.setattr("builtins.input", answer)
    return urls


def _federation_yaml(tmp_path, tcloud) -> tuple[str, str, str]:
    server = tcloud.add_collection(tmp_path / "server-coll", name="server")
    mapped = tcloud.add_collection(tmp_path / "m", entity_type="GCSv5_mapped_collection",
                                   name="mapped")
    guest = tcloud.add_collection(tmp_path / "g", name="guest")
    conf = tmp_path / "conf"
    (conf / "federation").mkdir(parents=True)
    (conf / "federation" / "two.yaml").write_text(textwrap.dedent(f"""\
        name: two
        transfer: {{collection_id: {server}, collection_path: /staging,
                   path: {tmp_path}/server-coll/staging}}
        sites:
          polaris:
            compute: {{type: globus, endpoint_id: 6f1f2d3e-0000-4000-8000-000000000001}}
            payload: {{type: globus-transfer, collection_id: {mapped},
                      collection_path: /flwr, path: /lus/flwr}}
          perlmutter:
            compute: {{type: globus, endpoint_id: 6f1f2d3e-0000-4000-8000-000000000002}}
            payload: {{type: globus-transfer, collection_id: {guest},
                      collection_path: /flwr, path: /pscratch/flwr}}
        """))
    return str(conf), mapped, guest


def test_flwr_hpc_login_stores_refreshable_tokens_and_consents_for_mapped_collections(
        auth, browser, tcloud, tmp_path, capsys, caplog):
    from flwr_hpc.control.cli import main

    tcloud.auth = auth  # the collection look-ups must carry the new user token
    conf, mapped, guest = _federation_yaml(tmp_path, tcloud)
    caplog.set_level(logging.DEBUG)
    assert main(["login", "--config-dir", conf, "federation=two"]) == 0
    out = capsys.readouterr().out
    # two flows: Compute + Transfer first, then the mapped collection's data_access
    assert len(browser) == 2 and "data_access" not in browser[0]
    assert f"{mapped}/data_access" in browser[1] and f"{guest}/data_access" not in browser[1]
    assert auth.grants == ["authorization_code", "authorization_code"]
    assert f"as identity {auth.identity_id}" in out and f"data_access granted for {mapped}" in out
    path = globus_auth.token_file()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    storage = globus_auth._storage(path)
    tokens = storage.get_token_data_by_resource_server()
    storage.close()
    assert set(tokens) == {"auth.globus.org", "transfer.api.globus.org", "funcx_service"}
    assert all(t.refresh_token for t in tokens.values())
    assert globus_auth.has_user_login()
    # the collections were looked up with the user's Transfer token, never refused
    assert tcloud.calls("GET", "/endpoint/") == 3 and tcloud.refused == 0
    # no token in anything printed or logged
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert auth.tokens_in(out + logged) == []
    # logged in already: no new flow
    assert main(["login"]) == 0 and len(browser) == 2


def test_a_transfer_run_with_only_user_tokens_moves_payloads(
        auth, browser, cloud, tcloud, rsps, run_quickstart, tmp_path):
    from flwr_hpc.compute import globus as gc

    globus_auth.login([])
    fed = transfer_federation(cloud, tcloud, tmp_path, {"polaris": 1, "perlmutter": 1})
    tcloud.auth = auth                       # Transfer accepts only Auth's live tokens
    gt.set_transfer_client(None)             # built from the stored login
    gc.set_shared_client(None)               # Compute too
    status, run_dir, summary = run_quickstart({"num-server-rounds": 1}, federation=fed)
    assert status == "finished:completed", (run_dir / "log.txt").read_text()[-3000:]
    assert {t["outcome"] for t in read_tasks(run_dir)} == {"ok"}
    assert len(tcloud.submitted) >= 2 * 2 and tcloud.refused == 0
    moved = sum(t["bytes_transferred"] for t in tcloud.tasks.values())
    assert moved > 0
    # Compute's requests carried the user's Compute token
    compute = [c.request for c in rsps.calls if "compute.api.globus.org" in c.request.url]
    assert compute and all(auth.check(r.headers.get("Authorization"), "funcx_service")
                           for r in compute)
    assert isinstance(gc.shared_client().app, type(globus_auth.shared_user_app()))


def test_an_expired_token_is_refreshed_and_a_revoked_login_names_flwr_hpc_login(
        auth, browser, tcloud, tmp_path):
    from helpers import transfer_store

    globus_auth.login([])
    tcloud.auth = auth
    gt.set_transfer_client(None)
    store = transfer_store(tcloud, tmp_path)
    store.put(*_obj("round 1"))
    assert store.flush("r1").status == "SUCCEEDED" and "refresh_token" not in auth.grants
    auth.expire_access_tokens()              # Transfer now answers 401 to the old token
    store.put(*_obj("round 2"))
    assert store.flush("r2").status == "SUCCEEDED"
    assert auth.grants.count("refresh_token") == 1  # refreshed once, then reused
    refused = tcloud.refused
    assert refused >= 1
    auth.revoke_refresh_tokens()
    store.put(*_obj("round 3"))
    with pytest.raises(gt.TransferError, match=r"invalid_grant.*flwr-hpc login") as err:
        store.flush("r3")
    assert auth.tokens_in(str(err.value)) == []


def test_the_login_is_used_and_refreshed_from_any_thread(auth, browser, tcloud):
    """The app is shared by the Compute client, the staging threads and the Transfer
    poller: a token read and a refresh on another thread than the one that opened the
    token store must work."""
    import threading

    globus_auth.login([])
    app = globus_auth.shared_user_app()  # opened on this thread
    headers: list[str] = []
    errors: list[BaseException] = []

    def use() -> None:
        try:
            authorizer = app.get_authorizer("transfer.api.globus.org")
            headers.append(authorizer.get_authorization_header())
            authorizer.handle_missing_authorization()  # as after a 401: refresh
            headers.append(authorizer.get_authorization_header())
        except BaseException as err:  # noqa: BLE001
            errors.append(err)

    t = threading.Thread(target=use)
    t.start()
    t.join(30)
    assert not errors, errors
    assert len(headers) == 2 and headers[0] != headers[1]  # a new token after the refresh
    assert auth.grants.count("refresh_token") == 1
    assert auth.check(headers[1], "transfer.api.globus.org")


def test_a_run_never_prompts_for_a_scope_the_login_lacks(auth, browser, tcloud, tmp_path):
    from helpers import transfer_store

    globus_auth.login([])                    # logged in before the mapped collection existed
    assert len(browser) == 1
    tcloud.auth = auth
    gt.set_transfer_client(None)
    store = transfer_store(tcloud, tmp_path, site_entity="GCSv5_mapped_collection")
    store.put(*_obj("payload"))
    with pytest.raises(gt.TransferError, match=r"data_access.*flwr-hpc login"):
        store.flush("r1")
    assert len(browser) == 1                 # nothing prompted


def test_logout_revokes_and_removes_the_tokens(auth, browser, tcloud, capsys):
    from flwr_hpc.control.cli import main

    globus_auth.login([])
    issued = set(auth.refresh)
    assert main(["logout"]) == 0
    assert "tokens for 3 service(s) removed" in capsys.readouterr().out
    assert all(auth.refresh[t]["revoked"] for t in issued)  # revoked at Auth
    assert not globus_auth.has_user_login()
    gt.set_transfer_client(None)
    with pytest.raises(gt.GlobusServiceError, match="flwr-hpc login"):
        gt.transfer_client([])
    assert main(["logout"]) == 0 and "No Globus login" in capsys.readouterr().out
    # Auth unreachable: the tokens are still removed here, and the user is told
    globus_auth.login([])
    auth.revoke_fails = True
    assert main(["logout"]) == 1
    out = capsys.readouterr().out
    assert "6 could not be revoked" in out and not globus_auth.has_user_login()


def test_no_login_and_no_client_is_an_error_naming_both(auth, tcloud):
    gt.set_transfer_client(None)
    with pytest.raises(gt.GlobusServiceError, match=r"flwr-hpc login.*GLOBUS_COMPUTE_CLIENT"):
        gt.transfer_client([])


def _obj(text: str) -> tuple[str, bytes]:
    from flwr_hpc.payload.objects import sha256_hex

    data = text.encode()
    return sha256_hex(data), data
