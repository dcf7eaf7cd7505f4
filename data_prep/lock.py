"""One cache, one writer: an advisory lock on the cache directory, held for the whole run.

POSIX record locks (``fcntl.lockf``) belong to the process, so they vanish with it however it ends
(SIGKILL included): a killed prep never leaves a stale lock behind. They are not inherited by the
worker processes, and they work on NFS (where ``flock`` may be local to one client). A plain run and ``merge`` take the
cache's lock exclusively; a ``--shard i/N`` run takes it shared (shards of one archive write
disjoint series side by side) plus an exclusive lock of its own shard, so two runs of the same
shard, or a plain run next to shards, still fail fast.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

#: The lock file inside the cache directory (empty; readers ignore it).
LOCK_NAME = ".medmae-prep.lock"


class CacheBusy(RuntimeError):
    """Another prep (or merge) holds the cache's lock."""


def _lock(path: Path, exclusive: bool) -> int:
    """Open and lock ``path``; raises BlockingIOError when another process holds a conflicting lock."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.lockf(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EACCES, errno.EAGAIN):
            raise BlockingIOError(e.errno, "lock held") from None
        raise
    return fd


@contextlib.contextmanager
def cache_lock(cache_dir: Path, shard: tuple[int, int] | None = None) -> Iterator[None]:
    """Hold the cache's writer lock (see the module docstring) or raise :class:`CacheBusy` at once."""
    cache_dir = Path(cache_dir)
    fds: list[int] = []
    try:
        try:
            fds.append(_lock(cache_dir / LOCK_NAME, exclusive=shard is None))
        except BlockingIOError:
            raise CacheBusy(
                f"cache directory {cache_dir} is in use by another `medmae prep` (lock {cache_dir / LOCK_NAME} "
                "is held); wait for it to finish or use another --out"
            ) from None
        if shard is not None:
            name = f".shard-{shard[0]:04d}-of-{shard[1]:04d}.lock"
            try:
                fds.append(_lock(cache_dir / "prep_state" / name, exclusive=True))
            except BlockingIOError:
                raise CacheBusy(
                    f"shard {shard[0]}/{shard[1]} of cache directory {cache_dir} is already being built by "
                    "another `medmae prep`; wait for it to finish"
                ) from None
        yield
    finally:
        for fd in reversed(fds):
            os.close(fd)
