"""Process pools whose workers die with their parent, and the crash-proof build supervisor.

A prep killed with SIGKILL (OOM killer, ``scancel``, Ctrl-\\) cannot shut its pool down; forked
workers keep the pool's pipes open and would wait forever. On Linux each worker asks the kernel
for SIGKILL when its parent goes away (``PR_SET_PDEATHSIG``), so a killed run leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import signal
import sys
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import connection as mp_connection
from typing import Any

_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent: int) -> None:
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
    return ProcessPoolExecutor(max_workers=workers, initializer=_die_with_parent, initargs=(os.getpid(),))


# ----------------------------------------------------------------------------- crash-proof builds

#: Default ``--decode-timeout``: seconds one file may take to decode before its worker is killed.
DEFAULT_DECODE_TIMEOUT = 300.0


class BuildWorkerError(RuntimeError):
    """A build worker hit a machine problem (disk full, permissions) that stops the run; a rerun resumes."""


def _build_worker_main(conn: Any, parent: int) -> None:
    """Child process: build the tasks the supervisor sends, reporting which file it is decoding."""
    _die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    # A Rust decoder that panics prints its message to stderr; a symbolised backtrace per corrupt
    # file (RUST_BACKTRACE=1) would flood the terminal and cost seconds each. The cause is logged.
    os.environ["RUST_BACKTRACE"] = "0"
    from data_prep.build import build_series

    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return
        if msg is None:
            return
        index, task, excluded = msg

        def on_file(rel: str | None, index: int = index) -> None:
            conn.send(("file", index, rel))

        try:
            result = build_series(task, excluded, on_file)
        except BaseException as e:  # noqa: BLE001 - the parent decides; only the class and errno travel
            conn.send(("error", index, f"{e.__class__.__name__}: {e}" if isinstance(e, OSError) else
                       e.__class__.__name__))
            return
        conn.send(("done", index, result))


@dataclass
class _Worker:
    process: Any
    conn: Any
    task: int | None = None  # index of the task it is building
    file: str | None = None  # rel of the file it is decoding (None: not decoding)
    since: float = 0.0  # when it started decoding that file


class BuildSupervisor:
    """Runs build tasks in worker processes that no decoder failure can take down with the run.

    Each worker builds one series at a time and says which file it is decoding. A worker that dies
    (segfault, abort, OOM kill) or spends more than ``decode_timeout`` seconds on one file is
    killed and replaced; the file it was on is handed back with the task as *excluded* (rel ->
    cause), so the series is built again without it and the file is counted ``pixel_decode_failed``.
    A task whose worker dies while not decoding a file (assembling, writing) is given up as
    ``build_failed``. Errors a worker reports for the machine (disk full) stop the run.

    Args:
        workers: worker processes (at least one: builds never run in the supervising process).
        decode_timeout: seconds one file may take to read and decode.
    """

    def __init__(self, workers: int, decode_timeout: float = DEFAULT_DECODE_TIMEOUT) -> None:
        self.workers = max(1, int(workers))
        self.decode_timeout = float(decode_timeout)
        self._ctx = multiprocessing.get_context("fork")

    def _start(self) -> _Worker:
        parent_conn, child_conn = self._ctx.Pipe(duplex=True)
        proc = self._ctx.Process(target=_build_worker_main, args=(child_conn, os.getpid()), daemon=True)
        proc.start()
        child_conn.close()
        return _Worker(proc, parent_conn)

    @staticmethod
    def _stop(w: _Worker) -> None:
        if w.process.is_alive():
            w.process.kill()
        w.process.join()
        w.conn.close()

    def run(
        self,
        tasks: Sequence[Any],
        finished: Callable[[int, Any], None],
        give_up: Callable[[int, Mapping[str, str], str], None],
    ) -> None:
        """Build ``tasks`` (BuildTask); ``finished(i, BuildResult)`` for each one built or rejected,
        ``give_up(i, excluded, cause)`` for one whose worker died outside any file's decoding."""
        queue = deque(range(len(tasks)))
        excluded: dict[int, dict[str, str]] = {}
        pool: list[_Worker] = []
        try:
            while queue or any(w.task is not None for w in pool):
                while queue:
                    w = next((w for w in pool if w.task is None), None)
                    if w is not None and not w.process.is_alive():  # died idle: replace it quietly
                        self._stop(w)
                        pool.remove(w)
                        continue
                    if w is None:
                        if len(pool) >= self.workers:
                            break
                        w = self._start()
                        pool.append(w)
                    index = queue.popleft()
                    try:
                        w.conn.send((index, tasks[index], excluded.get(index, {})))
                    except OSError:  # it died between the check and the send
                        self._stop(w)
                        pool.remove(w)
                        queue.appendleft(index)
                        continue
                    w.task, w.file, w.since = index, None, time.monotonic()
                busy = [w for w in pool if w.task is not None]
                now = time.monotonic()
                deadlines = [w.since + self.decode_timeout - now for w in busy if w.file is not None]
                timeout = max(0.0, min(deadlines)) if deadlines else None
                ready = set(mp_connection.wait([w.conn for w in busy], timeout=timeout))
                for w in busy:
                    failure = None
                    if w.conn in ready:
                        failure = self._receive(w, finished)
                    elif w.file is not None and time.monotonic() - w.since > self.decode_timeout:
                        failure = f"decoding took longer than {self.decode_timeout:g} s"
                    if failure is None:
                        continue
                    index, rel = w.task, w.file
                    assert index is not None
                    self._stop(w)
                    pool.remove(w)
                    if rel is not None:  # that file is to blame: build the series again without it
                        excluded.setdefault(index, {})[rel] = failure
                        queue.appendleft(index)
                    else:
                        give_up(index, excluded.get(index, {}), failure)
        finally:
            for w in pool:
                with contextlib.suppress(OSError, ValueError):
                    w.conn.send(None)
            for w in pool:
                w.process.join(timeout=5)
                self._stop(w)

    @staticmethod
    def _receive(w: _Worker, finished: Callable[[int, Any], None]) -> str | None:
        """Read everything the worker sent; returns a failure cause when it died."""
        while True:
            try:
                kind, index, payload = w.conn.recv()
            except (EOFError, OSError):
                w.process.join(timeout=5)
                code = w.process.exitcode
                if code is not None and code < 0:
                    try:
                        name = signal.Signals(-code).name
                    except ValueError:
                        name = f"signal {-code}"
                    return f"worker killed by {name}"
                return f"worker exited with status {code}"
            if kind == "file":
                w.file, w.since = payload, time.monotonic()
            elif kind == "done":
                w.task, w.file = None, None
                finished(index, payload)
            else:  # "error": the machine's problem, not a file's
                raise BuildWorkerError(f"building a series failed: {payload}")
            if not w.conn.poll():
                return None
