"""Run a function as an unprivileged user, so permission tests are real even when the suite runs as root.

Root reads files whatever their mode, so a chmod-000 file or folder proves nothing under root. The
function runs in a forked child that drops to ``nobody`` (all modules it needs must be imported
before the fork: the interpreter's own files may not be readable by ``nobody``). Without root the
function simply runs in a forked child as the current user.
"""

from __future__ import annotations

import multiprocessing.popen_fork  # noqa: F401 - imported lazily by a fork-context Process.start(): not by nobody
import os
import pickle
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

NOBODY_UID = 65534
NOBODY_GID = 65534


def world_readable_tmpdir() -> Path:
    """A temporary directory ``nobody`` can enter (pytest's tmp_path lives under a 0700 folder)."""
    path = Path(tempfile.mkdtemp(prefix="medmae-perm-"))
    path.chmod(0o755)
    return path


def run_unprivileged(fn: Callable[..., Any], *args: Any) -> Any:
    """Call ``fn(*args)`` in a forked child without root; return its result or re-raise its error."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(read_end)
        try:
            if os.geteuid() == 0:
                os.setgroups([])
                os.setgid(NOBODY_GID)
                os.setuid(NOBODY_UID)
            outcome: tuple[str, Any] = ("ok", fn(*args))
        except BaseException as e:  # noqa: BLE001 - reported to the parent
            outcome = ("error", f"{type(e).__name__}: {e}")
        with os.fdopen(write_end, "wb") as f:
            pickle.dump(outcome, f)
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    status, value = pickle.loads(data)
    if status != "ok":
        raise AssertionError(f"unprivileged call failed: {value}")
    return value
