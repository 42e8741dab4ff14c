"""The globus-transfer payload store against an offline fake of the Transfer service."""

from __future__ import annotations

import json

import pytest
from helpers import read_tasks, transfer_federation

from flwr_hpc.config import FederationConfig
from flwr_hpc.errors import ConfigError
from flwr_hpc.payload import transfer as gt
from flwr_hpc.payload.objects import sha256_hex
from flwr_hpc.payload.transfer import GlobusTransferStore, TransferError, TransferSettings


def _store(tcloud, tmp_path, **settings) -> tuple[GlobusTransferStore, str, str]:
    server = tcloud.add_collection(tmp_path / "server-coll", name="server")
    site = tcloud.add_collection(tmp_path / "polaris-coll", name="polaris")
    cfg = TransferSettings(collection_id=server, collection_path="/staging",
                           path=str(tmp_path / "server-coll" / "staging"),
                           **{"poll_s": 0.05, "deadline_s": 20, "inline_max_bytes": 0,
                              **settings})
    store = GlobusTransferStore("polaris", collection_id=site, collection_path="/flwr/store",
                                site_path=str(tmp_path / "polaris-coll" / "flwr" / "store"),
                                settings=cfg)
    return store, server, site


def _obj(text: str) -> tuple[str, bytes]:
    data = text.encode()
    return sha256_hex(data), data


def test_one_transfer_per_flush_carries_every_pending_object(tcloud, tmp_path):
    from flwr_hpc.payload.store import open_store

    store, server, site = _store(tcloud, tmp_path)
    objs = dict(_obj(f"object {i}" * 50) for i in range(5))
    assert sum(store.put(oid, data) for oid, data in objs.items()) == sum(map(len, objs.values()))
    assert all(store.has(oid) for oid in objs)
    report = store.flush("flwr-hpc run 7 round 1 train")
    assert report.files == 5 and report.bytes == sum(map(len, objs.values()))
    assert len(tcloud.submitted) == 1
    doc = tcloud.submitted[0]
    assert (doc["source_endpoint"], doc["destination_endpoint"]) == (server, site)
    assert doc["sync_level"] == 3 and doc["verify_checksum"] is True and doc["deadline"]
    assert doc["label"] == "flwr-hpc run 7 round 1 train to polaris"
    assert sorted(i["destination_path"] for i in doc["DATA"]) == sorted(
        f"/flwr/store/objects/{o[:2]}/{o}" for o in objs)
    # the site worker opens the same directory as plain files, every read verified
    at_site = open_store(store.spec())
    assert {oid: at_site.get(oid) for oid in objs} == objs
    # nothing new: no transfer, and objects already at the site are not staged again
    assert store.put(*next(iter(objs.items()))) == 0
    assert store.flush("again") is None and len(tcloud.submitted) == 1


def test_fetch_brings_site_objects_back_in_one_task_and_verifies_them(tcloud, tmp_path):
    from flwr_hpc.payload.store import open_store

    store, server, site = _store(tcloud, tmp_path)
    at_site = open_store(store.spec())
    replies = dict(_obj(f"reply {i}") for i in range(3))
    for oid, data in replies.items():
        at_site.put(oid, data)
    report = store.fetch(list(replies) * 2, "flwr-hpc run 7 round 1 train")
    assert report.files == 3 and len(tcloud.submitted) == 1
    assert tcloud.submitted[0]["source_endpoint"] == site
    assert {oid: store.get(oid) for oid in replies} == replies
    assert store.fetch(replies, "again") is None  # already here
    # a corrupted copy at the server is rejected by the reader's sha256 check
    oid, data = _obj("tampered")
    at_site.put(oid, data)
    store.fetch([oid], "x")
    (store.local.objects_dir / oid[:2] / oid).write_bytes(b"evil")
    with pytest.raises(Exception, match="sha256"):
        store.get(oid)


def test_missing_source_faults_are_watched_and_the_task_cancelled(tcloud, tmp_path):
    store, _, _ = _store(tcloud, tmp_path, max_faults=2)
    oid = sha256_hex(b"never written at the site")
    with pytest.raises(TransferError) as err:
        store.fetch([oid], "flwr-hpc run 1 round 1 train")
    text = str(err.value)
    assert "3 faults" in text and "transfer.max_faults=2" in text
    assert "FILE_NOT_FOUND" in text and "cancelled" in text and "polaris" in text
    task = tcloud.tasks[err.value.task_id]
    assert task["status"] == "FAILED" and task["fatal_error"]["code"] == "CANCELED"


def test_a_task_past_its_deadline_is_cancelled(tcloud, tmp_path):
    tcloud.setup_s = 30  # the service is slow to start the task
    store, _, _ = _store(tcloud, tmp_path, deadline_s=1)
    store.put(*_obj("x"))
    with pytest.raises(TransferError, match=r"within transfer.deadline_s=1 s"):
        store.flush("late")
    assert [t["fatal_error"]["code"] for t in tcloud.tasks.values()] == ["CANCELED"]
    assert tcloud.submitted[0]["deadline"]  # the service-side deadline is set as well
    assert not store.has(_obj("y")[0])


def test_failed_inactive_and_consent_errors_say_what_to_do(tcloud, tmp_path):
    store, server, site = _store(tcloud, tmp_path)
    store.put(*_obj("a"))
    tcloud.collections[site]["deny"] = True
    with pytest.raises(TransferError, match="FAILED .*PERMISSION_DENIED"):
        store.flush("denied")
    tcloud.collections[site]["deny"] = False
    tcloud.collections[site]["inactive"] = True
    with pytest.raises(TransferError, match="INACTIVE.*Renew the credentials"):
        store.flush("inactive")
    assert list(tcloud.tasks.values())[-1]["fatal_error"]["code"] == "CANCELED"
    tcloud.collections[site]["inactive"] = False
    tcloud.collections[site]["consent"] = True
    with pytest.raises(TransferError) as err:
        store.flush("consent")
    assert "ConsentRequired" in str(err.value) and f"{site}/data_access" in str(err.value)
    assert "globus session consent" in str(err.value)
    tcloud.collections[site]["consent"] = False
    assert store.flush("now it works").files == 1  # the pending object was kept


def test_a_flaky_submit_is_retried_with_the_same_submission_id(tcloud, tmp_path):
    store, _, _ = _store(tcloud, tmp_path)
    store.put(*_obj("a"))
    tcloud.fail_submits = 1
    assert store.flush("flaky").files == 1
    assert len(tcloud.tasks) == 1 and tcloud.calls("POST", "/transfer") == 2


def test_in_flight_corruption_is_caught_by_verify_checksum(tcloud, tmp_path):
    from flwr_hpc.payload.store import open_store

    store, _, _ = _store(tcloud, tmp_path)
    oid, data = _obj("weights" * 100)
    store.put(oid, data)
    tcloud.corrupt_once.add(oid)
    store.flush("corrupting network")
    task = next(iter(tcloud.tasks.values()))
    assert task["status"] == "SUCCEEDED" and task["faults"] == 1
    assert open_store(store.spec()).get(oid) == data


def test_labels_are_made_valid_for_the_service():
    assert gt.safe_label("flwr-hpc run 3 round 2 train/evaluate: a+b") == (
        "flwr-hpc run 3 round 2 train-evaluate- a-b")
    assert len(gt.safe_label("x" * 300)) == 128


def test_transfer_sites_are_validated():
    coll = "6f1f2d3e-0000-4000-8000-000000000002"

    def fed(payload, transfer=None):
        return FederationConfig.from_dict({"name": "g", "transfer": transfer or {},
                                           "sites": {"polaris": {"payload": payload}}})

    with pytest.raises(ConfigError, match=r"sites.polaris.payload.collection_id"):
        fed({"type": "globus-transfer"})
    with pytest.raises(ConfigError, match=r"sites.polaris.payload.collection_path"):
        fed({"type": "globus-transfer", "collection_id": coll})
    site = {"type": "globus-transfer", "collection_id": coll, "collection_path": "/s",
            "path": "/lus/s"}
    with pytest.raises(ConfigError, match=r"transfer.collection_id: .*server's collection"):
        fed(site)
    with pytest.raises(ConfigError, match=r"transfer.collection_path"):
        fed(site, {"collection_id": coll})
    ok = fed(site, {"collection_id": coll, "collection_path": "/x", "path": "/srv/x"})
    assert ok.uses_transfer() and ok.transfer["deadline_s"] == 900
    with pytest.raises(ConfigError, match="only globus-transfer and inline"):
        fed({"type": "filesystem", "collection_id": coll})
    round_trip = FederationConfig.from_dict(json.loads(json.dumps(ok.to_dict())))
    assert round_trip.transfer == ok.transfer


def test_quickstart_over_compute_and_transfer_moves_one_task_per_site_direction_phase(
        cloud, tcloud, run_quickstart, tmp_path, quickstart_fab):
    fed = transfer_federation(cloud, tcloud, tmp_path, {"polaris": 1, "perlmutter": 2})
    status, run_dir, summary = run_quickstart({"num-server-rounds": 2}, federation=fed)
    assert status == "finished:completed", (run_dir / "log.txt").read_text()[-3000:]
    tasks = read_tasks(run_dir)
    assert len(tasks) == 2 * 2 * 3 and {t["outcome"] for t in tasks} == {"ok"}
    assert summary["num_nodes"] == 3
    # one transfer task per site, per direction, per phase of each round -- never one per
    # client, never a broadcast
    # (plus one warm-up transfer per site, which carries the FAB before the first message)
    labels = [d["label"] for d in tcloud.submitted]
    warmups = [x for x in labels if " warm-up to " in x]
    assert sorted(x.rsplit(" ", 1)[-1] for x in warmups) == ["perlmutter", "polaris"]
    rounds = [x for x in labels if x not in warmups]
    assert len(rounds) == len(set(rounds)) == 2 * 2 * 2 * 2, labels
    for doc in tcloud.submitted:
        assert doc["sync_level"] == 3 and doc["verify_checksum"] is True
        site = doc["label"].rsplit(" ", 1)[-1]
        coll = fed.site(site).payload["collection_id"]
        assert coll in (doc["source_endpoint"], doc["destination_endpoint"])
        assert fed.transfer["collection_id"] in (doc["source_endpoint"],
                                                 doc["destination_endpoint"])
    # the global model crosses to a 2-client site once per phase, not twice
    to_perlmutter = [t for t in tcloud.tasks.values()
                     if t["label"].endswith("to perlmutter")]
    to_polaris = [t for t in tcloud.tasks.values() if t["label"].endswith("to polaris")]
    assert sum(t["bytes_transferred"] for t in to_perlmutter) < 1.3 * sum(
        t["bytes_transferred"] for t in to_polaris)
    # the FAB and the messages sit at the site, the replies at the server, all verified
    from flwr_hpc.payload.store import FilesystemStore

    fab_hash = sha256_hex(quickstart_fab)
    for site in ("polaris", "perlmutter"):
        assert FilesystemStore(fed.site(site).payload["path"]).get(fab_hash)
    # tasks reference the site's own path, never the server's staging directory
    body = json.dumps(cloud.submits[0]["body"])
    assert "/flwr/store" in body and "server-coll" not in body


def test_a_site_whose_collection_refuses_sits_out_and_the_run_goes_on(
        cloud, tcloud, run_quickstart, tmp_path):
    fed = transfer_federation(cloud, tcloud, tmp_path, {"polaris": 1, "perlmutter": 1})
    tcloud.collections[fed.site("polaris").payload["collection_id"]]["deny"] = True
    status, run_dir, summary = run_quickstart({"num-server-rounds": 1}, federation=fed)
    tasks = read_tasks(run_dir)
    polaris = [t for t in tasks if t["site"] == "polaris"]
    assert polaris and all(t["outcome"] == "error:MESSAGE_UNAVAILABLE" for t in polaris)
    assert "PERMISSION_DENIED" in polaris[0]["error"] and "staging" in polaris[0]["error"]
    assert all(t["outcome"] == "ok" for t in tasks if t["site"] == "perlmutter")
    assert status == "finished:completed"
    assert not any(s["endpoint"] == fed.site("polaris").compute["endpoint_id"]
                   for s in cloud.submits)  # nothing was submitted for the site


def test_headless_client_adds_data_access_only_for_non_ha_mapped_collections(
        tcloud, rsps, tmp_path, monkeypatch):
    """The real ClientApp + TransferClient; only Auth's token endpoint and Transfer are fake."""
    monkeypatch.setenv(gt.ENV_CLIENT_ID, "6f1f2d3e-0000-4000-8000-000000000009")
    monkeypatch.setenv(gt.ENV_CLIENT_SECRET, "s3cret-value")
    rsps.add("POST", "https://auth.globus.org/v2/oauth2/token", json={
        "access_token": "tok", "scope": "urn:globus:auth:scope:transfer.api.globus.org:all",
        "expires_in": 3600, "token_type": "Bearer",
        "resource_server": "transfer.api.globus.org", "other_tokens": []})
    mapped = tcloud.add_collection(tmp_path / "m", entity_type="GCSv5_mapped_collection")
    guest = tcloud.add_collection(tmp_path / "g", entity_type="GCSv5_guest_collection")
    ha = tcloud.add_collection(tmp_path / "h", entity_type="GCSv5_mapped_collection",
                               high_assurance=True)
    gt.set_transfer_client(None)
    gt.transfer_client([mapped, guest, ha, mapped])
    app = gt._tc._app  # the SDK keeps the app private
    scopes = " ".join(str(s) for s in app.scope_requirements["transfer.api.globus.org"])
    assert f"{mapped}/data_access" in scopes
    assert f"{guest}/data_access" not in scopes and f"{ha}/data_access" not in scopes
    assert tcloud.calls("GET", "/endpoint/") == 3  # each collection looked up once
    with pytest.raises(TransferError, match=r"collection 6f1f2d3e-.*not found"):
        gt.transfer_client(["6f1f2d3e-0000-4000-8000-00000000dead"])
    monkeypatch.delenv(gt.ENV_CLIENT_SECRET)
    gt.set_transfer_client(None)
    with pytest.raises(gt.GlobusServiceError, match="GLOBUS_COMPUTE_CLIENT_SECRET") as err:
        gt.transfer_client([mapped])
    assert "s3cret" not in str(err.value)


def test_sites_check_moves_a_probe_each_way_and_reports_an_offline_collection(
        cloud, tcloud, flwr_home, tmp_path):
    from flwr_hpc.control.sites import check_sites

    tcloud.setup_s = 0.3  # Transfer's fixed per-task overhead, scaled down
    fed = transfer_federation(cloud, tcloud, tmp_path, {"polaris": 1, "frontier": 1})
    tcloud.collections[fed.site("frontier").payload["collection_id"]]["offline"] = True
    checks = {c.site: c for c in check_sites(fed, flwr_home, timeout_s=30)}
    polaris = checks["polaris"]
    assert polaris.ok and polaris.store == "ok" and polaris.collection == "ok", polaris
    assert 0.3 <= polaris.transfer_to_s < 10 and 0.3 <= polaris.transfer_from_s < 10
    assert polaris.round_trip_s >= polaris.transfer_to_s + polaris.transfer_from_s
    labels = [d["label"] for d in tcloud.submitted]
    assert labels == ["flwr-hpc sites check to polaris", "flwr-hpc sites check from polaris"]
    frontier = checks["frontier"]
    assert not frontier.ok and "not reachable" in frontier.error
    assert "GCDisconnected" in frontier.error and frontier.round_trip_s is None


def _inline(cloud, tmp_path, sites, payload) -> dict:
    return {name: {"clients": n, "payload": {"type": "inline", **payload(name)},
                   "compute": {"type": "globus", "endpoint_id": cloud.add_endpoint(workers=n)}}
            for name, n in sites.items()}


def test_inline_replies_over_the_result_limit_become_file_replies(
        cloud, tcloud, run_quickstart, tmp_path):
    server = tcloud.add_collection(tmp_path / "server-coll", name="server")
    colls = {"frontier": tcloud.add_collection(tmp_path / "frontier-coll", name="frontier")}

    def payload(name):
        common = {"max_result_bytes": 200_000, "path": str(tmp_path / f"{name}-replies")}
        if name in colls:  # reached by Transfer; polaris shares the directory with us
            common.update(collection_id=colls[name], collection_path="/replies",
                          path=str(tmp_path / f"{name}-coll" / "replies"))
        return common

    fed = FederationConfig.from_dict({"name": "glob", "sites": _inline(
        cloud, tmp_path, {"polaris": 1, "frontier": 1}, payload=payload), "transfer": {
        "collection_id": server, "collection_path": "/staging",
        "path": str(tmp_path / "server-coll" / "staging"), "poll_s": 0.05}})
    status, run_dir, summary = run_quickstart({"num-server-rounds": 1, "model-size-mb": 0.5},
                                              federation=fed)
    assert status == "finished:completed", (run_dir / "log.txt").read_text()[-3000:]
    tasks = read_tasks(run_dir)
    assert len(tasks) == 4 and {t["outcome"] for t in tasks} == {"ok"}
    assert all(t["bytes_from_site"] > 500_000 for t in tasks if t["phase"] == "train")
    # polaris' replies were read from the shared directory, frontier's came by Transfer
    assert list((tmp_path / "polaris-replies" / "objects").glob("*/*"))
    # the train reply (0.5 MB model) crossed by Transfer, the small evaluate reply inline;
    # nothing was sent to the site by Transfer
    assert [d["label"] for d in tcloud.submitted] == [
        f"flwr-hpc run {run_dir.name} round 1 train from frontier"]
    # no result exceeded the limit on the wire (the objects were not in it)
    assert all(s["bytes"] < 8_000_000 for s in cloud.submits)
    # the node's Context came with the file reply (it was once read before the fetch)
    assert "could not read the Context" not in (run_dir / "log.txt").read_text()


def test_an_oversized_inline_reply_without_a_path_is_a_clear_error(cloud, run_quickstart,
                                                                   tmp_path):
    fed = FederationConfig.from_dict({"name": "glob", "sites": _inline(
        cloud, tmp_path, {"polaris": 1}, payload=lambda n: {"max_result_bytes": 200_000})})
    status, run_dir, _ = run_quickstart({"num-server-rounds": 1, "model-size-mb": 0.5},
                                        federation=fed)
    tasks = read_tasks(run_dir)
    train = [t for t in tasks if t["phase"] == "train"]
    assert train and train[0]["outcome"] == "error:REPLY_MESSAGE_UNAVAILABLE"
    assert "over the inline result limit of 200,000" in train[0]["error"]
    assert "payload.path" in train[0]["error"]
