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
