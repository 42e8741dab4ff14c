"""Process helpers shared by the CLI and the HPC SuperLink."""

from __future__ import annotations

import os


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
