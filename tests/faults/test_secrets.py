"""Credentials never reach logs, run directories, stores or error messages."""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import parse_qs

from helpers import read_tasks

SECRET = "XYZZY-client-secret-4711"
TOKEN = "PLUGH-access-token-0815"


def _auth(rsps) -> None:
    """Globus Auth's token endpoint, handing out one recognisable token per request."""
    def token(request):
        body = request.body if isinstance(request.body, str) else request.body.decode()
        scope = parse_qs(body)["scope"][0]
        server = "transfer.api.globus.org" if "transfer" in scope else "funcx_service"
        return 200, {"Content-Type": "application/json"}, json.dumps({
            "access_token": TOKEN, "scope": scope, "expires_in": 3600,
            "token_type": "Bearer", "resource_server": server, "other_tokens": []})

    rsps.add_callback("POST", "https://auth.globus.org/v2/oauth2/token", callback=token)


def test_no_secret_or_token_in_anything_a_run_writes(cloud, tcloud, rsps, run_quickstart,
                                                     flwr_home, tmp_path, monkeypatch,
                                                     caplog, capfd):
    from flwr_hpc.compute import globus as gc
    from flwr_hpc.config import FederationConfig
    from flwr_hpc.payload import transfer as gt

    # its own client id: the SDK keeps apps (and their tokens) per client id in memory
    monkeypatch.setenv("GLOBUS_COMPUTE_CLIENT_ID", "6f1f2d3e-0000-4000-8000-0000000000ab")
    monkeypatch.setenv("GLOBUS_COMPUTE_CLIENT_SECRET", SECRET)
    monkeypatch.setenv("GLOBUS_COMPUTE_USER_DIR", str(tmp_path / "sdk-token-store"))
    _auth(rsps)
    gc.set_shared_client(None)   # the real SDK clients, authenticated from the environment
    gt.set_transfer_client(None)
    server = tcloud.add_collection(tmp_path / "colls" / "server", name="server")
    sites = {}
    for name in ("polaris", "denied"):
        coll = tcloud.add_collection(tmp_path / "colls" / name, name=name)
        sites[name] = {"compute": {"type": "globus", "endpoint_id": cloud.add_endpoint()},
                       "payload": {"type": "globus-transfer", "collection_id": coll,
                                   "collection_path": "/store",
                                   "path": str(tmp_path / "colls" / name / "store")}}
    tcloud.collections[sites["denied"]["payload"]["collection_id"]]["deny"] = True
    fed = FederationConfig.from_dict({"name": "secret", "sites": sites, "transfer": {
        "collection_id": server, "collection_path": "/staging", "poll_s": 0.05,
        "inline_max_bytes": 0,  # everything by Transfer: staging to 'denied' is refused
        "path": str(tmp_path / "colls" / "server" / "staging")}})
    status, run_dir, _ = run_quickstart({"num-server-rounds": 1}, federation=fed)
    assert status == "finished:completed"
    outcomes = {t["site"]: t["outcome"] for t in read_tasks(run_dir)}
    assert outcomes == {"polaris": "ok", "denied": "error:MESSAGE_UNAVAILABLE"}  # an error path
    # the credentials were really used: every Globus request carried the token
    assert any(c.request.headers.get("Authorization") == f"Bearer {TOKEN}" for c in rsps.calls)

    written = [p for root in (flwr_home, tmp_path / "colls", run_dir)
               for p in Path(root).rglob("*") if p.is_file()]
    assert len(written) > 20
    leaks = [str(p) for p in written
             if SECRET.encode() in p.read_bytes() or TOKEN.encode() in p.read_bytes()]
    assert leaks == []
    out, err = capfd.readouterr()
    for text in (caplog.text, out, err):
        assert SECRET not in text and TOKEN not in text
