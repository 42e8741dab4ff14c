"""Process records and exclusive locks that hold on shared login nodes and filesystems.

``$HOME`` (and so ``$FLWR_HOME``) is shared by the login nodes of a facility: a pid
written there by one node means nothing -- or someone else's process -- on another. So
every record of a process names it completely: :class:`Holder` is the node (host name),
the pid and the process's start time. :func:`holder_state` answers ``alive``, ``dead``
(the pid is gone or now belongs to a later process) or ``elsewhere`` (another node: this
node cannot tell, so nothing here may kill, resume or replace it).

:class:`ExclusiveLock` is held for as long as a process runs something (a run's runner,
the service, an installer). It is two things. Where the filesystem supports ``flock``,
an ``flock`` on the file (released by the kernel whatever kills the holder, children
that inherited it included). And always an *owner file* created with ``O_EXCL`` next to
it, holding the :class:`Holder` -- because ``flock`` is missing on some mounts (Lustre or
NFS without it: ENOLCK/ENOSYS/EOPNOTSUPP; or forced with ``FLWR_HPC_LOCKS=file``) and
only node-local on others (Lustre's ``localflock``), while ``O_EXCL`` creation is atomic
across the nodes of Lustre and NFSv3+. A dead holder's owner file (same node; pid gone
or reused) is taken over atomically; one from another node never is: that node must
release it. The holder is also written into the lock file, so whoever finds the lock
taken can say who holds it.

Imports nothing of flwr-hpc: both sides may use it.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil

# flock is not there: fall back to the owner file
_NO_FLOCK = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL}
LOCK_MODE_ENV = "FLWR_HPC_LOCKS"  # "flock" (default: flock, owner file if unsupported) | "file"


def node_name() -> str:
    """The name of the node this process runs on, as records carry it."""
    return socket.gethostname()


def _start_time(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None


@dataclass(frozen=True)
class Holder:
    """A process named across nodes: host, pid and the process's start time (epoch s)."""

    node: str
    pid: int
    started: float

    def text(self) -> str:
        """The holder as the JSON a lock file or record stores."""
        return json.dumps(asdict(self), sort_keys=True)

    def describe(self) -> str:
        """``pid P on NODE``, for messages."""
        return f"pid {self.pid} on {self.node or 'an unknown node'}"

    @classmethod
    def parse(cls, text: str) -> Holder | None:
        """A holder from a lock file or record; a bare pid (files older than records)
        is taken to be this node's.
        """
        text = text.strip()
        if text.isdigit():
            return cls(node_name(), int(text), 0.0)
        try:
            data = json.loads(text)
            return cls(str(data["node"]), int(data["pid"]), float(data.get("started") or 0))
        except (ValueError, KeyError, TypeError):
            return None

    @classmethod
    def of(cls, data: dict[str, Any]) -> Holder:
        """A holder from a record's ``node``/``pid``/``started`` fields (``node`` absent:
        a record written before records named their node, taken to be this node's).
        """
        return cls(str(data.get("node") or node_name()), int(data["pid"]),
                   float(data.get("started") or 0.0))


def this_process() -> Holder:
    """The calling process as a :class:`Holder`."""
    return Holder(node_name(), os.getpid(), _start_time(os.getpid()) or time.time())


def holder_state(holder: Holder) -> str:
    """``alive``, ``dead`` or ``elsewhere`` (see the module docstring)."""
    if holder.node != node_name():
        return "elsewhere"
    started = _start_time(holder.pid)
    if started is None:
        return "dead"
    if holder.started and abs(started - holder.started) > 1.0:
        return "dead"  # the pid now belongs to a process started later
    return "alive"


class ExclusiveLock:
    """An exclusive, non-reentrant lock on ``path`` (see the module docstring)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.owner_path = self.path.with_name(self.path.name + ".owner")
        self._fh: Any = None
        self._owner_written = False
        self._me: Holder | None = None

    # -- taking and giving back

    def acquire(self, *, timeout: float | None = 0.0, poll_s: float = 0.2) -> bool:
        """Take the lock; wait up to ``timeout`` seconds (None: forever). True when taken."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self._try():
                return True
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(poll_s)

    def release(self) -> None:
        """Give the lock back, if this object holds it."""
        if self._owner_written:
            if self._owner() == self._me:  # never remove a file another process took over
                self.owner_path.unlink(missing_ok=True)
            self._owner_written = False
        if self._fh is not None:
            try:
                fcntl.flock(self._fh, fcntl.LOCK_UN)
            except OSError:
                pass
            self._fh.close()
            self._fh = None

    def __enter__(self) -> ExclusiveLock:
        """Wait for the lock."""
        self.acquire(timeout=None)
        return self

    def __exit__(self, *exc: object) -> None:
        """Give it back."""
        self.release()

    # -- who holds it

    def holder(self) -> Holder | None:
        """The process holding the lock, or None when it is free (a dead holder's owner
        file counts as free).
        """
        if os.environ.get(LOCK_MODE_ENV) != "file":
            try:
                fh = open(self.path)
            except OSError:
                fh = None
            if fh is not None:
                with fh:
                    try:
                        fcntl.flock(fh, fcntl.LOCK_SH | fcntl.LOCK_NB)
                    except BlockingIOError:
                        return Holder.parse(fh.read()) or Holder("", 0, 0.0)
                    except OSError as err:
                        if err.errno not in _NO_FLOCK:
                            raise
                    else:
                        fcntl.flock(fh, fcntl.LOCK_UN)
        owner = self._owner()
        if owner is not None and holder_state(owner) != "dead":
            return owner
        return None

    # -- internals

    def _owner(self) -> Holder | None:
        try:
            return Holder.parse(self.owner_path.read_text()) or Holder("", 0, 0.0)
        except FileNotFoundError:
            return None

    def _try(self) -> bool:
        """One attempt: the ``flock`` (where the filesystem has it), then the owner file
        (always: ``flock`` may be node-local on a shared filesystem).
        """
        me = this_process()
        fh = None
        if os.environ.get(LOCK_MODE_ENV) != "file":
            fh = open(self.path, "a+")
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                fh.close()
                return False
            except OSError as err:
                fh.close()
                fh = None
                if err.errno not in _NO_FLOCK:
                    raise
        for _ in range(2):  # a dead holder's file is moved aside once, then retried
            try:
                fd = os.open(self.owner_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
            except FileExistsError:
                owner = self._owner()
                if owner is not None and holder_state(owner) == "dead":
                    self._take_over(owner)
                    continue
                break
            with os.fdopen(fd, "w") as out:
                out.write(me.text())
            self._owner_written, self._me = True, me
            if fh is not None:
                fh.seek(0)
                fh.truncate()
                fh.write(me.text())
                fh.flush()
                self._fh = fh
            return True
        if fh is not None:
            fcntl.flock(fh, fcntl.LOCK_UN)
            fh.close()
        return False

    def _take_over(self, stale: Holder) -> None:
        """Move a dead holder's owner file aside -- atomically, so of two processes
        taking over at once only one moves it -- and put it back if what was moved was
        not the dead holder's after all (it was replaced in between).
        """
        aside = self.owner_path.with_name(f"{self.owner_path.name}.stale-{uuid.uuid4().hex[:12]}")
        try:
            os.rename(self.owner_path, aside)
        except FileNotFoundError:
            return
        try:
            moved = Holder.parse(aside.read_text())
        except OSError:
            moved = None
        if moved == stale:
            aside.unlink(missing_ok=True)
            return
        try:  # a live owner's file: put it back unless a new one exists
            os.link(aside, self.owner_path)
        except FileExistsError:
            pass
        aside.unlink(missing_ok=True)
