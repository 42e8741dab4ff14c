"""Process helpers shared by the CLI and the HPC SuperLink."""

from __future__ import annotations

import os
from collections.abc import Mapping


def pid_alive(pid: int) -> bool:
    """True if a process with ``pid`` exists (zombies included)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def die_with_parent() -> None:
    """In a worker process: be killed when the process that started us dies (Linux
    ``PR_SET_PDEATHSIG``), so a killed runner leaves no site workers behind."""
    import ctypes
    import signal
    import sys

    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        return
    if os.getppid() == 1:  # the parent died before prctl took effect
        os._exit(1)


# glibc: allocations of at least this many bytes are mmap-ed and unmapped when freed
_MMAP_THRESHOLD_BYTES = 1 << 20


def return_large_buffers() -> bool:
    """Make freed multi-megabyte buffers (payload objects, arrays) go back to the OS.

    glibc serves big allocations with ``mmap`` and unmaps them on free -- until the first
    such free, after which it raises its threshold (up to 32 MiB) and the next buffers of a
    payload come from the heap, where freed memory stays in the process's RSS. A fixed
    threshold (``mallopt(M_MMAP_THRESHOLD)``) keeps the server's memory at what is live.
    Returns whether it was applied (Linux/glibc only).
    """
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-3, _MMAP_THRESHOLD_BYTES))  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


# glibc tunables for processes that move payloads (read by the dynamic loader at start-up,
# so they are set in the environment of the processes we start, never changed in place):
# - hugetlb=1: malloc asks for transparent huge pages (madvise) on its big mmap-ed
#   chunks. Filling a fresh 64 MiB buffer (a file read, an array chunk join) then takes
#   32 page faults instead of 16,384: measured 4x faster (43 -> 11 ms per 64 MiB) where
#   the kernel's THP mode is ``madvise`` or ``always``; a no-op elsewhere.
# - mmap_threshold: as :func:`return_large_buffers`, from the first allocation on.
_TUNABLES = {"glibc.malloc.hugetlb": "1",
             "glibc.malloc.mmap_threshold": str(_MMAP_THRESHOLD_BYTES)}


def large_buffer_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """``env`` (default: this process's) plus the glibc tunables above, for a process that
    moves payloads (the runner, and through it every local site worker). Tunables already
    in ``GLIBC_TUNABLES`` are kept as they are; other C libraries ignore the variable."""
    out = dict(os.environ if env is None else env)
    tunables = [t for t in out.get("GLIBC_TUNABLES", "").split(":") if t]
    named = {t.split("=", 1)[0] for t in tunables}
    tunables += [f"{k}={v}" for k, v in _TUNABLES.items() if k not in named]
    out["GLIBC_TUNABLES"] = ":".join(tunables)
    return out
