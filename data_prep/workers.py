"""The crash-proof build supervisor: build workers that no decoder failure can take down with the run.

Its workers die with their parent like every pool's (:mod:`data_prep.pool`). A worker looks up
:func:`data_prep.build.build_series` only once it runs: a late binding, so the forked worker calls
the function as the parent left it (tests replace it there). Nothing below ``build`` imports this
module, so the graph has no circle.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from multiprocessing import connection as mp_connection
from typing import Any

from data_prep.pool import die_with_parent, worker_pool
from data_prep.reasons import Reason

__all__ = [
    "DEFAULT_DECODE_TIMEOUT",
    "DEFAULT_SERIES_TIMEOUT",
    "BuildSupervisor",
    "BuildWorkerError",
    "GiveUp",
    "worker_pool",
]

# ----------------------------------------------------------------------------- crash-proof builds

#: Default ``--decode-timeout``: seconds one file may take to decode before its worker is killed.
DEFAULT_DECODE_TIMEOUT = 300.0

#: Default ``--series-timeout``: seconds of worker time one series may cost over all its attempts
#: (each file a worker crashed or hung on costs an attempt), so that a series of many hanging files
#: costs half an hour (six default decode timeouts) at most, not one decode timeout per file.
DEFAULT_SERIES_TIMEOUT = 1800.0

log = logging.getLogger("data_prep")


class BuildWorkerError(RuntimeError):
    """A build worker hit a machine problem (disk full, permissions) that stops the run; a rerun resumes."""


def _build_worker_main(conn: Any, parent: int) -> None:
    """Child process: build the tasks the supervisor sends, reporting which file it is decoding."""
    die_with_parent(parent)
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
            conn.send(
                ("error", index, f"{e.__class__.__name__}: {e}" if isinstance(e, OSError) else e.__class__.__name__)
            )
            return
        conn.send(("done", index, result))


@dataclass
class _Worker:
    process: Any
    conn: Any
    task: int | None = None  # index of the task it is building
    file: str | None = None  # rel of the file it is decoding (None: not decoding)
    since: float = 0.0  # when it started decoding that file
    began: float = 0.0  # when it was handed its task


#: ``give_up(i, excluded, cause, reason)``: task ``i`` is not built; its files not in ``excluded``
#: (rel -> cause, each ``pixel_decode_failed``) are rejected with ``reason``.
GiveUp = Callable[[int, Mapping[str, str], str, Reason], None]


class BuildSupervisor:
    """Runs build tasks in worker processes that no decoder failure can take down with the run.

    Each worker builds one series at a time and says which file it is decoding. A worker that dies
    (segfault, abort, OOM kill) or spends more than ``decode_timeout`` seconds on one file is
    killed and replaced; the file it was on is handed back with the task as *excluded* (rel ->
    cause), so the series is built again without it and the file is counted ``pixel_decode_failed``.
    A task whose worker dies while not decoding a file (assembling, writing) is given up as
    ``build_failed``. A worker that dies idle (its series reported done, no task in flight) costs
    nothing: it is replaced. Errors a worker reports for the machine (disk full) stop the run.

    Every attempt at a series counts against its ``series_timeout``: past it the worker is killed
    and the series given up as ``series_timeout`` (files already blamed keep their reason), so slow
    files that each stay under ``decode_timeout``, or one hanging file after another, cannot hold a
    worker for longer than that.

    Args:
        workers: worker processes (at least one: builds never run in the supervising process).
        decode_timeout: seconds one file may take to read and decode.
        series_timeout: seconds of worker time one series may take over all its attempts.
    """

    def __init__(
        self,
        workers: int,
        decode_timeout: float = DEFAULT_DECODE_TIMEOUT,
        series_timeout: float = DEFAULT_SERIES_TIMEOUT,
    ) -> None:
        self.workers = max(1, int(workers))
        self.decode_timeout = float(decode_timeout)
        self.series_timeout = float(series_timeout)
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

    def run(self, tasks: Sequence[Any], finished: Callable[[int, Any], None], give_up: GiveUp) -> None:
        """Build ``tasks`` (BuildTask); ``finished(i, BuildResult)`` for each one built or rejected,
        ``give_up(i, excluded, cause, reason)`` for one whose worker died outside any file's decoding
        (``build_failed``) or that ran out of its time (``series_timeout``)."""
        queue = deque(range(len(tasks)))
        excluded: dict[int, dict[str, str]] = {}
        spent: dict[int, float] = {}  # worker seconds of the task's finished attempts
        pool: list[_Worker] = []
        try:
            while queue or any(w.task is not None for w in pool):
                self._dispatch(queue, tasks, excluded, pool)
                busy = [w for w in pool if w.task is not None]
                ready = set(mp_connection.wait([w.conn for w in busy], timeout=self._wait_time(busy, spent)))
                for w in busy:
                    index = w.task
                    failure = self._receive(w, finished) if w.conn in ready else None
                    if w.task is None:  # its series is done
                        if failure is not None:  # and it died idle (an OOM kill, say): nothing to blame
                            log.warning("a build worker died while idle (%s); replaced", failure)
                            self._stop(w)
                            pool.remove(w)
                        continue
                    assert index is not None
                    now = time.monotonic()
                    rel, out_of_time = w.file, False
                    if failure is None:
                        if rel is not None and now - w.since > self.decode_timeout:
                            failure = f"decoding took longer than {self.decode_timeout:g} s"
                        elif spent.get(index, 0.0) + now - w.began > self.series_timeout:
                            failure, rel, out_of_time = self._out_of_time(), None, True
                        else:
                            continue
                    self._stop(w)
                    pool.remove(w)
                    spent[index] = spent.get(index, 0.0) + now - w.began
                    if rel is not None:  # that file is to blame: build the series again without it
                        excluded.setdefault(index, {})[rel] = failure
                        if spent[index] < self.series_timeout:
                            queue.appendleft(index)
                            continue
                        failure, out_of_time = self._out_of_time(), True
                    reason = Reason.SERIES_TIMEOUT if out_of_time else Reason.BUILD_FAILED
                    give_up(index, excluded.get(index, {}), failure, reason)
        finally:
            for w in pool:
                with contextlib.suppress(OSError, ValueError):
                    w.conn.send(None)
            for w in pool:
                w.process.join(timeout=5)
                self._stop(w)

    def _out_of_time(self) -> str:
        return f"building the series took longer than {self.series_timeout:g} s"

    def _dispatch(
        self, queue: deque[int], tasks: Sequence[Any], excluded: Mapping[int, Mapping[str, str]], pool: list[_Worker]
    ) -> None:
        """Hand queued tasks to idle workers, starting workers up to ``self.workers``; an idle worker
        found dead is replaced."""
        while queue:
            w = next((w for w in pool if w.task is None), None)
            if w is not None and not w.process.is_alive():  # died idle: replace it quietly
                self._stop(w)
                pool.remove(w)
                continue
            if w is None:
                if len(pool) >= self.workers:
                    return
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
            w.task, w.file, w.began = index, None, time.monotonic()

    def _wait_time(self, busy: Sequence[_Worker], spent: Mapping[int, float]) -> float:
        """Seconds until the first busy worker passes its file's or its series' deadline."""
        now = time.monotonic()
        deadlines = [w.since + self.decode_timeout - now for w in busy if w.file is not None]
        deadlines += [w.began + self.series_timeout - spent.get(w.task, 0.0) - now for w in busy if w.task is not None]
        return max(0.0, min(deadlines, default=0.0))

    @staticmethod
    def _receive(w: _Worker, finished: Callable[[int, Any], None]) -> str | None:
        """Read everything the worker sent; returns a failure cause when it died (after its series was
        done too: then ``w.task`` is None)."""
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
