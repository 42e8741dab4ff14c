"""FABs from the wire, checked before anything is built from them, and installed atomically.

A FAB is code somebody else sent: the server (StartRun) and every site install it. Flower's
installer builds the install path from the FAB's own ``publisher``, ``name`` and
``version``, extracts into the system temp directory, and copies into place file by file (a
crash leaves a half-written app that every later run adopts). Here, before installing:

- the FAB's size, number of files, and expanded size are bounded (a 410 KB zip bomb would
  otherwise expand to GBs), counted while extracting, not taken from the archive's headers;
- member names must be plain relative paths (no ``..``, no absolute paths, no links);
- ``publisher``, ``name`` and ``version`` must be plain names (``../`` in a version would
  install outside the apps directory);
- every file is checked against the FAB's ``.info/CONTENT`` sha256 manifest.

It is extracted into a temporary directory *inside* the apps directory and renamed into
place once complete, under a file lock (several site workers may install at once), with a
marker holding the FAB's hash. An install without the marker is half-written and redone.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
import stat
import tempfile
import tomllib
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from flwr_hpc.errors import FlwrHpcError
from flwr_hpc.locks import ExclusiveLock

MAX_FAB_BYTES = int(float(os.environ.get("FLWR_HPC_MAX_FAB_MB", "64")) * (1 << 20))
MAX_FAB_EXPANDED_BYTES = int(float(os.environ.get("FLWR_HPC_MAX_FAB_EXPANDED_MB", "512"))
                             * (1 << 20))
MAX_FAB_FILES = 20_000
INSTALLED_MARKER = ".flwr-hpc-fab"  # holds the FAB's sha256 once the install is complete

_PLAIN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.+!_-]{0,63}$")


class FabError(FlwrHpcError):
    """A FAB that is malformed, too large, or names itself unsafely."""


@dataclass(frozen=True)
class FabInfo:
    """What a FAB says about itself in its ``pyproject.toml`` (checked plain names)."""

    publisher: str
    name: str
    version: str

    @property
    def fab_id(self) -> str:
        """``publisher/name``."""
        return f"{self.publisher}/{self.name}"


def _check_member(info: zipfile.ZipInfo) -> None:
    path = PurePosixPath(info.filename)
    mode = (info.external_attr >> 16) & 0o170000
    if (info.filename.startswith("/") or "\\" in info.filename or ".." in path.parts
            or ":" in info.filename or "\0" in info.filename):
        raise FabError(f"FAB member {info.filename!r} is not a plain relative path")
    if mode and mode not in (stat.S_IFREG, stat.S_IFDIR):
        raise FabError(f"FAB member {info.filename!r} is not a regular file (links and "
                       "devices are refused)")
    if "__pycache__" in path.parts or path.suffix in (".pyc", ".pyo"):
        # Python runs a cached .pyc instead of its source (an unchecked-hash one without
        # even looking at the source), so shipped bytecode could run other code than the
        # sources the manifest and the allow-list vouch for; `flwr build` never packs it
        raise FabError(f"FAB member {info.filename!r} is compiled bytecode: a FAB carries "
                       "sources only (they are byte-compiled at install)")


def check_fab(fab_bytes: bytes) -> FabInfo:
    """The FAB's publisher, name and version, after checking its size, members and names.
    Raises :class:`FabError` saying what is wrong.
    """
    if len(fab_bytes) > MAX_FAB_BYTES:
        raise FabError(f"the FAB is {len(fab_bytes):,} bytes, over the limit of "
                       f"{MAX_FAB_BYTES:,} (FLWR_HPC_MAX_FAB_MB)")
    try:
        zf = zipfile.ZipFile(io.BytesIO(fab_bytes))
    except zipfile.BadZipFile as err:
        raise FabError(f"the FAB is not a zip archive: {err}") from None
    with zf:
        members = zf.infolist()
        if len(members) > MAX_FAB_FILES:
            raise FabError(f"the FAB has {len(members):,} files, over the limit of "
                           f"{MAX_FAB_FILES:,}")
        for info in members:
            _check_member(info)
        if sum(i.file_size for i in members) > MAX_FAB_EXPANDED_BYTES:
            raise FabError(f"the FAB expands to over {MAX_FAB_EXPANDED_BYTES:,} bytes "
                           "(FLWR_HPC_MAX_FAB_EXPANDED_MB)")
        try:
            with zf.open("pyproject.toml") as fh:
                text = fh.read(1 << 20).decode()
            project = tomllib.loads(text)
        except KeyError:
            raise FabError("the FAB has no pyproject.toml") from None
        except (UnicodeDecodeError, tomllib.TOMLDecodeError, zipfile.BadZipFile) as err:
            raise FabError(f"the FAB's pyproject.toml cannot be read: {err}") from None
    try:
        publisher = str(project["tool"]["flwr"]["app"]["publisher"])
        name = str(project["project"]["name"])
        version = str(project["project"]["version"])
    except (KeyError, TypeError):
        raise FabError("the FAB's pyproject.toml lacks [project] name/version or "
                       "[tool.flwr.app] publisher") from None
    for key, value, pattern in (("tool.flwr.app.publisher", publisher, _PLAIN_NAME),
                                ("project.name", name, _PLAIN_NAME),
                                ("project.version", version, _VERSION)):
        if not pattern.match(value) or ".." in value:
            raise FabError(f"the FAB's pyproject.toml {key} = {value!r} is not a plain name "
                           "(letters, digits, '.', '_', '-'; no '..' or '/')")
    return FabInfo(publisher, name, version)


def _extract(zf: zipfile.ZipFile, dest: Path) -> None:
    """Extract member by member, counting the bytes actually inflated (a zip's declared
    sizes can lie).
    """
    total = 0
    for info in zf.infolist():
        _check_member(info)
        target = dest / info.filename
        if info.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        with zf.open(info) as src, open(target, "wb") as out:
            while chunk := src.read(1 << 20):
                total += len(chunk)
                if total > MAX_FAB_EXPANDED_BYTES:
                    raise FabError(f"the FAB expands to over {MAX_FAB_EXPANDED_BYTES:,} "
                                   "bytes (FLWR_HPC_MAX_FAB_EXPANDED_MB)")
                out.write(chunk)


def _verify_content(root: Path) -> None:
    """Every file listed in Flower's ``.info/CONTENT`` manifest has its sha256."""
    manifest = root / ".info" / "CONTENT"
    if not manifest.is_file():
        raise FabError("the FAB has no .info/CONTENT manifest (not built by `flwr build`)")
    for line in manifest.read_text().strip().splitlines():
        rel, expected, _size = line.rsplit(",", 2)
        path = root / rel
        if ".." in PurePosixPath(rel).parts or not path.is_file():
            raise FabError(f"the FAB's manifest lists {rel!r}, which it does not contain")
        if hashlib.sha256(path.read_bytes()).hexdigest() != expected:
            raise FabError(f"the FAB's file {rel!r} does not match its manifest's sha256")


def _byte_compile(tmp: Path, final: Path) -> None:
    """Byte-compile the app's Python files once, at install (``__pycache__`` beside them,
    named as if compiled at ``final``): the runner and every site worker then load them
    instead of compiling each module again -- always so where ``PYTHONDONTWRITEBYTECODE``
    is set (as on many shared login nodes and in CI), where no process writes them.
    Compiling runs no code; a file that does not compile is left to fail, as before, where
    it is imported.
    """
    import compileall

    # quiet=2 prints nothing (not even errors); no stdout swap, which would hide other
    # threads' output in a runner
    compileall.compile_dir(str(tmp), ddir=str(final), quiet=2, workers=1, force=True)


def install_fab(fab_bytes: bytes, fab_hash: str, install_dir: Path) -> Path:
    """Install the FAB under ``install_dir/apps/`` (Flower's layout:
    ``publisher.name.version.hash8``) and return the app's directory. Idempotent and safe
    against concurrent installers and a crash halfway through.
    """
    if hashlib.sha256(fab_bytes).hexdigest() != fab_hash:
        raise FabError(f"the FAB does not match its sha256 {fab_hash[:16]}…")
    info = check_fab(fab_bytes)
    apps = install_dir / "apps"
    apps.mkdir(parents=True, exist_ok=True, mode=0o700)
    final = apps / f"{info.publisher}.{info.name}.{info.version}.{fab_hash[:8]}"
    with ExclusiveLock(apps / ".install.lock"):  # shared filesystems: see flwr_hpc.locks
        marker = final / INSTALLED_MARKER
        if marker.is_file() and marker.read_text().strip() == fab_hash:
            return final
        tmp = Path(tempfile.mkdtemp(prefix=".installing-", dir=apps))
        try:
            try:
                with zipfile.ZipFile(io.BytesIO(fab_bytes)) as zf:
                    _extract(zf, tmp)
            except (zipfile.BadZipFile, zlib.error, EOFError) as err:
                raise FabError(f"the FAB's archive is corrupted: {err}") from None
            _verify_content(tmp)
            shutil.rmtree(tmp / ".info")
            _byte_compile(tmp, final)
            (tmp / INSTALLED_MARKER).write_text(fab_hash)
            if final.exists():  # a half-written install (no marker), or another FAB's
                shutil.rmtree(final)
            os.rename(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        # leftovers of installers that were killed mid-extraction
        for stale in apps.glob(".installing-*"):
            shutil.rmtree(stale, ignore_errors=True)
    return final


# Libraries worth importing once in a site's forkserver (flwr_hpc.compute.local) instead of
# in every worker it starts: seconds of import each. Only third-party packages: the app's
# own modules must come from the installed FAB, never from a preloaded copy.
PRELOADABLE = ("torch", "transformers", "peft", "opacus", "datasets", "flwr_datasets")
_IMPORT_LINE = re.compile(rb"^\s*(?:import|from)\s+([A-Za-z_][A-Za-z0-9_]*)", re.MULTILINE)


def heavy_imports(fab_bytes: bytes) -> list[str]:
    """The :data:`PRELOADABLE` libraries the FAB's Python files import (sorted); ``[]``
    for an unreadable FAB (it is checked properly where it is installed).
    """
    found: set[str] = set()
    try:
        with zipfile.ZipFile(io.BytesIO(fab_bytes)) as zf:
            for info in zf.infolist():
                if info.filename.endswith(".py") and info.file_size <= 4 << 20:
                    found.update(m.decode() for m in _IMPORT_LINE.findall(zf.read(info)))
    except (zipfile.BadZipFile, OSError, ValueError):
        return []
    return sorted(found & set(PRELOADABLE))


# directories Flower's FAB rules drop whole (APP_PUBLISH_EXCLUDE_PATTERNS): never walked
_DROPPED_DIRS = (".venv", ".flwr")


def build_fab(app: Path) -> bytes:
    """The FAB of the app in ``app``: the same bytes as Flower's
    ``flwr.cli.build.build_fab_from_disk(app)`` (tested), built from the same files, but
    without walking directories whose every file Flower's rules would drop -- ``.venv``,
    ``.flwr``, ``__pycache__`` and what the app's ``.gitignore`` ignores as a directory
    (unless it re-includes anything with ``!``). Flower walks and resolves every file
    first: with a virtual environment inside the app's directory (this repository's
    ``.venv``: 66 000 files) that is about 5 s of CPU per build; here it is a few ms.
    """
    from flwr.cli.build import build_fab_from_files
    from flwr.cli.utils import build_pathspec, load_gitignore_patterns

    root = app.expanduser().resolve()
    ignore = root / ".gitignore"
    patterns = load_gitignore_patterns(ignore.read_bytes() if ignore.is_file() else b"")
    ignored = None if any(str(p).lstrip().startswith("!") for p in patterns) else (
        build_pathspec(patterns))
    files: dict[str, Path] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        rel_dir = Path(dirpath).relative_to(root).as_posix()
        prefix = "" if rel_dir == "." else rel_dir + "/"
        dirnames[:] = [d for d in dirnames if not (
            d == "__pycache__" or (prefix + d) in _DROPPED_DIRS
            or (ignored is not None and ignored.match_file(prefix + d + "/")))]
        for filename in filenames:  # as Flower's collect_files: no links, nothing outside
            path = Path(dirpath) / filename
            if path.is_symlink() or not path.resolve().is_relative_to(root):
                continue
            files[prefix + filename] = path
    return build_fab_from_files(files)[0]
