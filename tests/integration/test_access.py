"""Only the owner may use the HPC SuperLink; browsers and oversized bodies are refused
(issue #16, items 1-2). The other user is a real second uid (``nobody``, via setpriv)."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from helpers import APP_DIR

from flwr_hpc.control.access import peer_uid

BIN = Path(sys.executable).parent
NOBODY = 65534
ROUTES = ["/v1/control/start-run", "/v1/control/list-runs", "/v1/control/stop-run",
          "/v1/control/stream-logs", "/v1/control/list-nodes", "/hpc/resume-run"]

# sends every route once and prints {route: [status, content-type, body]} as JSON
CLIENT = r"""
import http.client, json, sys
port, body_file = int(sys.argv[1]), sys.argv[2]
bodies = {"/v1/control/start-run": open(body_file, "rb").read()}
out = {}
for method, route in [("GET", "/health")] + [("POST", r) for r in json.loads(sys.argv[3])]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    ctype = "application/json" if route.startswith("/hpc/") else "application/protobuf"
    body = bodies.get(route, b'{"run_id": 1}' if route.startswith("/hpc/") else b"")
    conn.request(method, route, body=body if method == "POST" else None,
                 headers={"content-type": ctype} if method == "POST" else {})
    res = conn.getresponse()
    out[route] = [res.status, res.getheader("content-type"), res.read().decode()]
    conn.close()
print(json.dumps(out))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_nobody() -> list[str]:
    return ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]


@pytest.fixture
def service(flwr_home):
    port = _free_port()
    up = subprocess.run([str(BIN / "flwr-hpc"), "up", "--port", str(port)],
                        capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert up.returncode == 0, up.stderr
    yield port
    subprocess.run([str(BIN / "flwr-hpc"), "down"], capture_output=True, timeout=60)


@pytest.fixture
def nobody_dir():
    path = Path(tempfile.mkdtemp(prefix="flwr-hpc-nobody-"))
    os.chown(path, NOBODY, NOBODY)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _start_run_body() -> bytes:
    from flwr.common.serde import fab_to_proto
    from flwr.proto.control_pb2 import StartRunRequest
    from flwr.supercore.fab import Fab

    from flwr_hpc.fab import build_fab
    from flwr_hpc.payload.objects import sha256_hex

    fab = build_fab(APP_DIR)
    return StartRunRequest(fab=fab_to_proto(Fab(sha256_hex(fab), fab, {}))).SerializeToString()


def test_peer_uid_reads_the_owner_of_a_loopback_connection():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    client = socket.create_connection(server.getsockname())
    conn, peer = server.accept()
    try:
        assert peer_uid(peer, server.getsockname()) == os.getuid()
        assert peer_uid(("127.0.0.1", 1), server.getsockname()) is None  # no such socket
    finally:
        for s in (conn, client, server):
            s.close()


def test_another_user_is_refused_on_every_route(service, flwr_home, nobody_dir):
    runs = flwr_home / "hpc" / "runs"
    before = sorted(runs.iterdir())
    body = nobody_dir / "start-run.bin"
    body.write_bytes(_start_run_body())
    os.chmod(body, 0o644)
    res = subprocess.run([*_as_nobody(), sys.executable, "-c", CLIENT, str(service),
                          str(body), json.dumps(ROUTES)], capture_output=True, text=True,
                         timeout=120, cwd=nobody_dir)
    assert res.returncode == 0, res.stderr
    answers = json.loads(res.stdout)
    assert sorted(answers) == sorted(["/health", *ROUTES])
    for route, (status, ctype, text) in answers.items():
        assert status == 403, (route, status, text)
        assert ctype == "application/json"
        err = json.loads(text)  # Flower's error format, printed by the flwr CLI
        assert err["code"] == 9, route  # ApiErrorCode.NO_PERMISSIONS
        assert f"serves only its owner (uid {os.getuid()}" in err["detail"]
        assert f"your uid is {NOBODY}" in err["detail"]
    assert sorted(runs.iterdir()) == before  # nothing started, nothing written

    # the same client as the owner gets through (the refusal is about the uid)
    mine = subprocess.run([sys.executable, "-c", CLIENT, str(service), str(body),
                           json.dumps(["/v1/control/list-runs"])], capture_output=True,
                          text=True, timeout=60)
    assert json.loads(mine.stdout)["/v1/control/list-runs"][0] == 200
    assert json.loads(mine.stdout)["/health"][0] == 200


def test_stock_flwr_cli_of_another_user_prints_who_may_use_it(service, flwr_home, nobody_dir):
    home = nobody_dir / "flwr_home"
    home.mkdir()
    shutil.copy(flwr_home / "config.toml", home / "config.toml")
    for path in (home, home / "config.toml"):
        os.chown(path, NOBODY, NOBODY)
    res = subprocess.run([*_as_nobody(), str(BIN / "flwr"), "ls", "hpc"], capture_output=True,
                         text=True, timeout=120, cwd=nobody_dir,
                         env={"PATH": os.environ["PATH"], "FLWR_HOME": str(home),
                              "HOME": str(nobody_dir)})
    out = res.stdout + res.stderr
    assert res.returncode != 0
    assert "serves only its owner" in out and f"your uid is {NOBODY}" in out


def _post(port: int, route: str, body: bytes, headers: dict) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("POST", route, body=body, headers=headers)
    res = conn.getresponse()
    data = res.read()
    conn.close()
    return res.status, json.loads(data) if res.status >= 400 else {}


def test_browser_shaped_requests_are_refused(service, flwr_home):
    runs = flwr_home / "hpc" / "runs"
    body = _start_run_body()
    route = "/v1/control/start-run"
    status, err = _post(service, route, body, {"content-type": "text/plain"})
    assert (status, err["code"]) == (415, 1002) and "application/protobuf" in err["detail"]
    status, err = _post(service, route, body, {"content-type": "application/protobuf",
                                               "origin": "https://evil.example"})
    assert status == 403 and "web pages" in err["detail"]
    status, err = _post(service, route, body, {"content-type": "application/protobuf",
                                               "host": f"evil.example:{service}"})
    assert status == 403 and "evil.example" in err["detail"]
    assert list(runs.iterdir()) == []
    # the CLI's own shape is accepted
    status, _ = _post(service, "/v1/control/list-runs", b"",
                      {"content-type": "application/protobuf"})
    assert status == 200


def test_an_oversized_body_is_refused_before_it_is_read(service):
    sock = socket.create_connection(("127.0.0.1", service))
    t0 = time.monotonic()
    sock.sendall(b"POST /v1/control/start-run HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n"
                 b"content-type: application/protobuf\r\ncontent-length: %d\r\n\r\n"
                 % (service, 500 * 1024 * 1024))
    sock.sendall(b"\0" * 65536)  # a little of the 500 MiB; the answer must not wait for it
    sock.settimeout(10)
    answer = b""
    while chunk := sock.recv(4096):  # the service answers and closes the connection
        answer += chunk
    sock.close()
    head = answer.decode(errors="replace")
    assert head.startswith("HTTP/1.0 413") or head.startswith("HTTP/1.1 413"), head
    assert "over the limit" in head
    assert time.monotonic() - t0 < 5


def test_start_run_with_a_hostile_fab_is_a_400_saying_why(service, flwr_home, quickstart_fab):
    from flwr.common.serde import fab_to_proto
    from flwr.proto.control_pb2 import StartRunRequest
    from flwr.supercore.fab import Fab
    from helpers import with_pyproject

    from flwr_hpc.payload.objects import sha256_hex

    evil = with_pyproject(quickstart_fab, 'version = "1.0.0"', 'version = "../x"')
    body = StartRunRequest(fab=fab_to_proto(Fab(sha256_hex(evil), evil, {}))
                           ).SerializeToString()
    status, err = _post(service, "/v1/control/start-run", body,
                        {"content-type": "application/protobuf"})
    assert (status, err["code"]) == (400, 14)  # ApiErrorCode.FAILED_TO_CREATE_RUN
    assert "project.version = '../x' is not a plain name" in err["detail"]
    assert list((flwr_home / "hpc" / "runs").iterdir()) == []


def test_a_run_writes_only_private_files_and_only_under_flwr_home(flwr_home, tmp_path):
    """Run directories, FAB installs and site stores are the owner's only (0700/0600), and
    nothing lands in $HOME or the temp directory (each an empty directory here)."""
    home, tmp = tmp_path / "home", tmp_path / "tmp"
    home.mkdir()
    tmp.mkdir()
    res = subprocess.run([str(BIN / "flwr-hpc"), "run", str(APP_DIR)], capture_output=True,
                         text=True, timeout=300, stdin=subprocess.DEVNULL,
                         env={**os.environ, "HOME": str(home), "TMPDIR": str(tmp)})
    assert res.returncode == 0, res.stderr[-3000:]
    assert list(home.iterdir()) == [] and list(tmp.iterdir()) == []
    written = [p for p in flwr_home.rglob("*") if p.name != "config.toml"]
    assert any(p.name == "app.fab" for p in written)
    assert any(p.parent.name == "apps" and p.is_dir() for p in written)  # FAB installs
    assert any("sites" in p.parts for p in written)  # site stores
    shared = [p for p in written if p.stat().st_mode & 0o077]
    assert shared == []


@pytest.mark.slow(40)
def test_the_lora_job_writes_nothing_in_home_or_tmp(flwr_home, tmp_path):
    """The LoRA job loads its data with `datasets` (which caches under ~/.cache by
    default): the cache goes under $FLWR_HOME instead."""
    from helpers import REPO_ROOT

    home, tmp = tmp_path / "home", tmp_path / "tmp"
    home.mkdir()
    tmp.mkdir()
    env = {k: v for k, v in os.environ.items()
           if k not in ("XDG_CACHE_HOME", "HF_HOME", "HF_DATASETS_CACHE")}
    res = subprocess.run([str(BIN / "flwr-hpc"), "run", str(REPO_ROOT), "-c",
                          'overrides="strategy.num_rounds=1 train.local_steps=1 '
                          'evaluate.max_generate=0"'], capture_output=True, text=True,
                         timeout=600, stdin=subprocess.DEVNULL,
                         env={**env, "HOME": str(home), "TMPDIR": str(tmp)})
    assert res.returncode == 0, res.stderr[-3000:]
    assert sorted(p.name for p in home.rglob("*")) == [] and list(tmp.iterdir()) == []
    assert (flwr_home / "hpc" / "cache" / "huggingface").is_dir()
