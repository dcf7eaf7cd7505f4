"""Process pools whose workers die with their parent.

A prep killed with SIGKILL (OOM killer, ``scancel``, Ctrl-\\) cannot shut its pool down; forked
workers keep the pool's pipes open and would wait forever. On Linux each worker asks the kernel
for SIGKILL when its parent goes away (``PR_SET_PDEATHSIG``), so a killed run leaves nothing behind.

This is the bottom of the process layer: the scan pool (:mod:`data_prep.scan`) and the build
supervisor (:mod:`data_prep.workers`) both start their workers through it, and it imports nothing
of ``data_prep``.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from concurrent.futures import ProcessPoolExecutor

_PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int) -> None:
    """In a worker: ask for SIGKILL when the process ``parent`` goes away (exit now if it already has)."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):  # no prctl: fall back to the ppid check below only
            pass
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def worker_pool(workers: int) -> ProcessPoolExecutor:
    """A ``ProcessPoolExecutor`` of ``workers`` processes tied to this process' lifetime."""
    return ProcessPoolExecutor(max_workers=workers, initializer=die_with_parent, initargs=(os.getpid(),))
