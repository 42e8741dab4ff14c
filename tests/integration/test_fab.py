"""Hostile FABs: unsafe names, spoofed publishers, zip bombs, oversized FABs and
half-written installs (issue #16, item 3). Each fault is shown first, then refused."""

from __future__ import annotations

import io
import os
import shutil
import zipfile
from pathlib import Path

import pytest
from flwr.common.constant import ErrorCode
from helpers import APP_DIR, REPO_ROOT, fed_of, rebuild, train_messages, with_pyproject

import flwr_hpc.fab as fabmod
from flwr_hpc.fab import INSTALLED_MARKER, FabError, check_fab, install_fab
from flwr_hpc.payload.objects import sha256_hex


def test_a_traversal_version_escapes_flowers_installer_and_is_refused_here(
        quickstart_fab, tmp_path, flwr_home):
    from flwr.cli.install import install_from_fab

    from flwr_hpc.config import load_federation
    from flwr_hpc.server.runs import prepare_run

    evil = with_pyproject(quickstart_fab, 'version = "1.0.0"', 'version = "../../../escaped"')
    # the fault: Flower's installer builds the path from the FAB's own version
    target = tmp_path / "a" / "b"
    path = install_from_fab(evil, install_dir=target, skip_prompt=True)
    assert not path.resolve().is_relative_to((target / "apps").resolve())

    with pytest.raises(FabError, match=r"project.version = '\.\./\.\./\.\./escaped'"):
        check_fab(evil)
    site_apps = tmp_path / "site"
    with pytest.raises(FabError):
        install_fab(evil, sha256_hex(evil), site_apps)
    assert not site_apps.exists() or list(site_apps.rglob("*.py")) == []
    runs = flwr_home / "hpc" / "runs"
    with pytest.raises(FabError, match="not a plain name"):
        prepare_run(evil, {}, load_federation([]))
    assert not runs.exists() or list(runs.iterdir()) == []  # nothing written
    for field in ('publisher = "flwrhpc"', 'name = "quickstart-numpy"'):
        key, _, _ = field.partition(" = ")
        with pytest.raises(FabError, match="not a plain name"):
            check_fab(with_pyproject(quickstart_fab, field, f'{key} = "../x"'))


def test_a_fab_naming_an_allowed_publisher_is_not_trusted_by_its_name(
        grid_factory, monkeypatch, quickstart_fab):
    """A site restricted to ``flwrhpc/*`` meets a FAB by someone else that merely names
    that publisher: names are not authenticated, so only the sha256 admits it."""
    monkeypatch.setenv("FLWR_HPC_ALLOWED_FABS", "flwrhpc/*")
    grid = grid_factory(fed_of({"a": 1}, engine="thread-pool"))
    (reply,) = grid.send_and_receive(train_messages(grid, 1), timeout=60)
    assert reply.error.code == ErrorCode.LOAD_CLIENT_APP_EXCEPTION
    assert "matches only the name the FAB gives itself" in reply.error.reason
    assert "FLWR_HPC_ALLOW_FABS_BY_NAME=1" in reply.error.reason
    assert sha256_hex(quickstart_fab) in reply.error.reason  # what to add
    apps = grid.sites["a"].apps_dir
    assert not apps.exists() or not list(apps.rglob(INSTALLED_MARKER))  # nothing installed

    monkeypatch.setenv("FLWR_HPC_ALLOWED_FABS", sha256_hex(quickstart_fab))
    (ok,) = grid.send_and_receive(train_messages(grid, 2), timeout=60)
    assert not ok.has_error(), ok.error.reason

    # a site that accepts names on purpose
    monkeypatch.setenv("FLWR_HPC_ALLOWED_FABS", "flwrhpc/*")
    monkeypatch.setenv("FLWR_HPC_ALLOW_FABS_BY_NAME", "1")
    (ok,) = grid.send_and_receive(train_messages(grid, 3), timeout=60)
    assert not ok.has_error(), ok.error.reason


def test_a_zip_bomb_is_refused_before_it_expands(quickstart_fab, tmp_path, monkeypatch):
    monkeypatch.setattr(fabmod, "MAX_FAB_EXPANDED_BYTES", 8 << 20)
    bomb = rebuild(quickstart_fab, {"quickstart_numpy/data.bin": b"\0" * (64 << 20)})
    assert len(bomb) < 200_000  # 64 MB of zeros compress to a few hundred KB
    with pytest.raises(FabError, match="expands to over 8,388,608 bytes"):
        check_fab(bomb)
    # extraction counts the bytes it inflates too (not only the archive's headers)
    with pytest.raises(FabError, match="expands to over"):
        fabmod._extract(zipfile.ZipFile(io.BytesIO(bomb)), tmp_path / "x")
    # a corrupted member is a FabError, not a crash
    corrupt = bytearray(quickstart_fab)
    at = corrupt.index(b"quickstart_numpy/client_app.py") + 60
    corrupt[at:at + 40] = b"\xff" * 40
    with pytest.raises(FabError):
        install_fab(bytes(corrupt), sha256_hex(bytes(corrupt)), tmp_path / "c")
    assert [p.name for p in (tmp_path / "c" / "apps").iterdir()] == [".install.lock"]
    with pytest.raises(FabError, match="expands to over"):
        install_fab(bomb, sha256_hex(bomb), tmp_path / "site")
    assert not (tmp_path / "site").exists()  # refused before anything was written


def test_an_oversized_fab_and_odd_members_are_refused(quickstart_fab, monkeypatch):
    monkeypatch.setattr(fabmod, "MAX_FAB_BYTES", 1000)
    with pytest.raises(FabError, match="over the limit of 1,000"):
        check_fab(quickstart_fab)
    monkeypatch.undo()
    with pytest.raises(FabError, match="not a zip archive"):
        check_fab(b"PK\x03\x04 not really")
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zf:
        zf.writestr("../outside.py", "print('x')")
    with pytest.raises(FabError, match="not a plain relative path"):
        check_fab(out.getvalue())
    link = io.BytesIO()
    with zipfile.ZipFile(link, "w") as zf:
        info = zipfile.ZipInfo("pyproject.toml")
        info.external_attr = (0o120777 << 16)  # a symlink
        zf.writestr(info, "/etc/passwd")
    with pytest.raises(FabError, match="not a regular file"):
        check_fab(link.getvalue())


def test_a_half_written_install_is_redone_not_adopted(quickstart_fab, tmp_path):
    from flwr.clientapp.utils import get_load_client_app_fn

    fab_hash = sha256_hex(quickstart_fab)
    info = check_fab(quickstart_fab)
    final = tmp_path / "apps" / f"{info.publisher}.{info.name}.{info.version}.{fab_hash[:8]}"
    # what an installer killed halfway leaves: the directory, part of the files
    (final / "quickstart_numpy").mkdir(parents=True)
    (final / "pyproject.toml").write_text("[project]\n")
    (tmp_path / "apps" / ".installing-killed").mkdir()
    (tmp_path / "apps" / ".installing-killed" / "half.py").write_text("x = ")

    path = install_fab(quickstart_fab, fab_hash, tmp_path)
    assert path == final
    assert (final / INSTALLED_MARKER).read_text() == fab_hash
    assert (final / "quickstart_numpy" / "client_app.py").is_file()
    assert not list((tmp_path / "apps").glob(".installing-*"))
    app = get_load_client_app_fn("", str(path), multi_app=True)(
        f"{info.publisher}/{info.name}", info.version, fab_hash)
    assert callable(app)
    # installed once: a second call returns it without touching it
    mtime = (final / INSTALLED_MARKER).stat().st_mtime_ns
    assert install_fab(quickstart_fab, fab_hash, tmp_path) == final
    assert (final / INSTALLED_MARKER).stat().st_mtime_ns == mtime


def test_start_run_with_a_hostile_fab_answers_why(flwr_home, quickstart_fab):
    """Through the service's own code path: refused, no run directory."""
    from flwr_hpc.config import load_federation
    from flwr_hpc.control.service import HPCSuperLink

    link = HPCSuperLink(load_federation([]), flwr_home)
    try:
        evil = with_pyproject(quickstart_fab, 'version = "1.0.0"', 'version = "../x"')
        with pytest.raises(FabError, match="project.version"):
            link.start_run(evil, sha256_hex(evil), {})
        assert list(link.runs_dir.iterdir()) == []
    finally:
        link.shutdown()


def test_build_fab_is_flowers_fab_without_walking_what_flower_drops(tmp_path):
    from flwr.cli.build import build_fab_from_disk

    from flwr_hpc.fab import build_fab

    # this repository (its .venv, .git, caches) and a test app: the very same bytes
    assert build_fab(REPO_ROOT) == build_fab_from_disk(REPO_ROOT)
    assert build_fab(APP_DIR) == build_fab_from_disk(APP_DIR)
    # an app whose .gitignore ignores a directory, with a .venv, a cache and a link: none
    # of them is walked or shipped; what Flower ships, ships
    app = tmp_path / "app"
    shutil.copytree(APP_DIR, app, ignore=shutil.ignore_patterns("__pycache__"))
    (app / ".gitignore").write_text("out/\n*.log\n")
    for d in ("out", ".venv/lib", "pkg/__pycache__"):
        (app / d).mkdir(parents=True)
        (app / d / "x.py").write_text("raise SystemExit\n")
    (app / "pkg" / "keep.py").write_text("KEEP = 1\n")
    (app / "linked.py").symlink_to(app / "pkg" / "keep.py")
    fab = build_fab(app)
    assert fab == build_fab_from_disk(app)
    with zipfile.ZipFile(io.BytesIO(fab)) as zf:
        names = set(zf.namelist())
    assert "pkg/keep.py" in names
    assert not {n for n in names if n.startswith(("out/", ".venv/")) or "__pycache__" in n
                or n == "linked.py"}
    # a .gitignore that re-includes (!) something: directories are walked as Flower does
    (app / ".gitignore").write_text("out/\n!out/x.py\n")
    assert build_fab(app) == build_fab_from_disk(app)


def test_an_installed_fab_is_byte_compiled_once_and_imports_from_its_cache(
        quickstart_fab, tmp_path):
    import importlib.util
    import subprocess
    import sys

    fab_hash = sha256_hex(quickstart_fab)
    final = install_fab(quickstart_fab, fab_hash, tmp_path)
    sources = sorted(final.rglob("*.py"))
    assert len(sources) >= 3
    for src in sources:
        pyc = Path(importlib.util.cache_from_source(str(src)))
        assert pyc.is_file(), src
        # compiled under the installed path, not the temporary one it was extracted to
        code = pyc.read_bytes()
        assert str(src).encode() in code and b".installing-" not in code
    # a process that may not write bytecode (PYTHONDONTWRITEBYTECODE) loads the cache:
    # importlib's verbose log says it matched the .pyc, and nothing new is written
    before = {p: p.stat().st_mtime_ns for p in final.rglob("*.pyc")}
    run = subprocess.run([sys.executable, "-v", "-c", "import quickstart_numpy.client_app"],
                         cwd=final, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1",
                              "PYTHONPATH": str(final)})
    assert run.returncode == 0, run.stderr[-2000:]
    client_pyc = importlib.util.cache_from_source(str(final / "quickstart_numpy" /
                                                      "client_app.py"))
    assert f"matches {final / 'quickstart_numpy' / 'client_app.py'}" in run.stderr
    assert f"code object from '{client_pyc}'" in run.stderr
    assert {p: p.stat().st_mtime_ns for p in final.rglob("*.pyc")} == before


def test_a_fab_shipping_bytecode_is_refused(quickstart_fab, tmp_path):
    import importlib.util
    import py_compile
    import subprocess
    import sys

    # the threat: an unchecked-hash .pyc beside a benign source is what Python runs
    demo = tmp_path / "demo" / "pkg"
    demo.mkdir(parents=True)
    (demo / "__init__.py").write_text("")
    (demo / "mod.py").write_text("WHO = 'source'\n")
    evil = tmp_path / "evil.py"
    evil.write_text("WHO = 'bytecode'\n")
    cached = Path(importlib.util.cache_from_source(str(demo / "mod.py")))
    py_compile.compile(str(evil), cfile=str(cached), dfile=str(demo / "mod.py"),
                       invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
    who = subprocess.run([sys.executable, "-c", "import pkg.mod; print(pkg.mod.WHO)"],
                         cwd=demo.parent, capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    assert who.stdout.strip() == "bytecode", who.stderr

    # a FAB carrying that .pyc for its ClientApp is refused before anything is written
    member = (f"quickstart_numpy/__pycache__/client_app.{sys.implementation.cache_tag}"
              ".pyc")
    hostile = rebuild(quickstart_fab, {member: cached.read_bytes()})
    with pytest.raises(FabError, match=f"FAB member '{member}' is compiled bytecode"):
        check_fab(hostile)
    with pytest.raises(FabError, match="compiled bytecode"):
        install_fab(hostile, sha256_hex(hostile), tmp_path / "site")
    assert not (tmp_path / "site").exists()
    # so is a sourceless module outside __pycache__
    with pytest.raises(FabError, match="'quickstart_numpy/extra.pyc' is compiled bytecode"):
        check_fab(rebuild(quickstart_fab, {"quickstart_numpy/extra.pyc": b"x"}))
