"""Every verb of the stock `flwr` CLI against the HPC SuperLink either works or prints the
project's own message (Flower's JSON error), never a bare HTTP status."""

from __future__ import annotations

import json
import re
import zipfile
from pathlib import Path
from urllib.parse import urlparse

import pytest
from helpers import APP_DIR, cli

NOT_HPC = "is not supported on an HPC federation"


def _flwr(*args: str) -> tuple[int, str]:
    res = cli("flwr", *args, cwd=APP_DIR, timeout=300)
    out = re.sub(r"\s+", " ", re.sub(r"[│╭╮╰╯─]", " ", res.stdout + res.stderr))
    # never Flower's fallback for an error body it cannot read
    assert "Server error" not in out and "Client error" not in out, out
    assert "developer.mozilla.org" not in out, out
    return res.returncode, out


@pytest.fixture
def node_ids(superlink) -> list[int]:
    from flwr_hpc.config import load_federation

    return [c.node_id for c in load_federation([]).clients()]


def test_supernode_and_federation_listings_show_the_sites(node_ids):
    rc, out = _flwr("supernode", "ls", "hpc", "--format", "json")
    assert rc == 0, out
    listed = json.loads(out[out.index("{"):])
    rows = {int(n["node-id"]): n for n in listed["nodes"]}
    assert sorted(rows) == sorted(node_ids)
    assert {n["owner-name"] for n in rows.values()} == {"alpha", "beta", "gamma"}
    assert {n["status"] for n in rows.values()} == {"online"}

    rc, out = _flwr("federation", "ls", "hpc", "--format", "json")
    assert rc == 0, out
    (fed,) = json.loads(out[out.index("{"):])["federations"]
    assert fed["id"] == "local" and "3 sites, 4 clients" in fed["description"]

    rc, out = _flwr("federation", "ls", "hpc", "--federation", "local", "--format", "json")
    assert rc == 0, out
    shown = json.loads(out[out.index("{"):])["federation"]
    assert sorted(int(n["node_id"]) for n in shown["nodes"]) == sorted(node_ids)
    assert {n["owner"] for n in shown["nodes"]} == {"alpha", "beta", "gamma"}

    rc, out = _flwr("federation", "ls", "hpc", "--federation", "elsewhere")
    assert rc == 1 and "federation 'elsewhere' is not served here" in out, out


def test_pull_packs_a_finished_runs_artifacts(superlink, flwr_home):
    rc, out = _flwr("run", ".", "hpc", "--stream")
    assert rc == 0, out
    run_id = int(out.split("Successfully started run ")[1].split()[0])
    rc, out = _flwr("pull", str(run_id), "hpc")
    assert rc == 0, out
    url = re.search(r"downloaded from: (\S+)", out).group(1)
    path = Path(urlparse(url).path)
    assert path == flwr_home / "hpc" / "runs" / str(run_id) / "artifacts.zip"
    assert path.stat().st_mode & 0o077 == 0  # the owner's only
    names = set(zipfile.ZipFile(path).namelist())
    assert {f"run-{run_id}/{n}" for n in ("status.json", "tasks.jsonl", "log.txt")} <= names

    rc, out = _flwr("pull", "12345", "hpc")
    assert rc == 1 and "run 12345 not found" in out, out
    rc, out = _flwr("log", "12345", "hpc")
    assert rc == 1 and "run 12345 not found" in out, out
    rc, out = _flwr("stop", "12345", "hpc")
    assert rc == 1 and "Run 12345 couldn't be stopped" in out, out


def test_verbs_that_do_not_apply_say_why(superlink, node_ids, tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = tmp_path / "node.pub"
    key.write_bytes(ec.generate_private_key(ec.SECP384R1()).public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))
    node = str(node_ids[0])
    expected = {
        ("supernode", "register", str(key), "hpc"): "`register-node` " + NOT_HPC,
        ("supernode", "unregister", node, "hpc"): "`unregister-node` " + NOT_HPC,
        ("federation", "create", "other", "hpc"): "`create-federation` " + NOT_HPC,
        ("federation", "archive", "local", "hpc"): "`archive-federation` " + NOT_HPC,
        ("federation", "add-supernode", node, "local", "hpc"):
            "`add-node-to-federation` " + NOT_HPC,
        ("federation", "remove-supernode", node, "local", "hpc"):
            "`remove-node-from-federation` " + NOT_HPC,
        ("federation", "remove-account", "local", "someone", "hpc"):
            "`remove-account-from-federation` " + NOT_HPC,
        ("federation", "simulation-config", "local", "hpc", "--num-supernodes", "2"):
            "`configure-simulation-federation` " + NOT_HPC,
        ("federation", "invite", "list", "hpc"): "`list-invitations` " + NOT_HPC,
    }
    for args, text in expected.items():
        rc, out = _flwr(*args)
        assert rc == 1 and text in out, (args, out)
        assert any(why in out for why in ("client slots of its sites", "exactly one federation",
                                          "is a federation config")), out
    rc, out = _flwr("run", ".", "hpc", "--federation-config", "num-supernodes=2")
    assert rc == 1 and "--federation-config sets a simulation" in out, out
    assert "Successfully started run" not in out
    rc, out = _flwr("login", "hpc")  # refused by the CLI itself, in its own words
    assert rc == 1 and "requires TLS" in out, out
