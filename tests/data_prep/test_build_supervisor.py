"""Issue 16.9: the build supervisor survives a worker that dies while idle, and bounds what one series
of slow or hanging files can cost (``--series-timeout``, counted ``series_timeout``)."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from pathlib import Path

import pytest

import data_prep.build
import data_prep.pipeline
from data_prep import Reason, prep_archive
from data_prep.workers import BuildSupervisor
from tests.data_prep.conftest import PrepRun
from tests.data_prep.factory import volume_series


def _cache_bytes(cache: Path) -> dict[str, bytes]:
    """Every file a run leaves in its cache (manifest, report, arrays, sidecars, prep state), by path."""
    return {str(p.relative_to(cache)): p.read_bytes() for p in sorted(cache.rglob("*")) if p.is_file()}


class _BusySupervisor(BuildSupervisor):
    """A supervisor that is slow to come back after each finished series (a loaded machine, a slow
    disk): by the time it reads on, a worker killed 50 ms after its "done" is already dead."""

    def run(self, tasks, finished, give_up) -> None:  # type: ignore[override]
        def slow(index, result) -> None:
            finished(index, result)
            time.sleep(0.3)

        super().run(tasks, slow, give_up)


@pytest.mark.parametrize("workers", [1, 2])
def test_a_worker_killed_after_done_is_replaced_without_blame(tmp_path: Path, monkeypatch, caplog,
                                                              workers: int) -> None:
    a = tmp_path / "archive"
    for i in range(4):
        volume_series(a / f"s{i}", n=3, rows=8, cols=8, seed=10 + i)
    salt = tmp_path / "prep.salt"
    prep_archive([a], tmp_path / "ref", salt_file=salt, workers=workers, progress=False)

    real = data_prep.build.build_series

    def build_then_get_killed(task, excluded=None, on_file=None):
        """Runs in the worker: build, then the kernel kills the idle worker (an OOM kill) 50 ms later."""
        result = real(task, excluded, on_file)
        threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGKILL)).start()
        return result

    monkeypatch.setattr(data_prep.build, "build_series", build_then_get_killed)
    monkeypatch.setattr(data_prep.pipeline, "BuildSupervisor", _BusySupervisor)
    caplog.set_level(logging.WARNING, logger="data_prep")
    out = tmp_path / "cache"
    summary = prep_archive([a], out, salt_file=salt, workers=workers, progress=False)

    assert (summary.series_built, summary.rejects) == (4, {})
    assert _cache_bytes(out) == _cache_bytes(tmp_path / "ref")
    assert "died while idle (worker killed by SIGKILL)" in caplog.text
    assert str(a) not in caplog.text


def test_a_series_of_slow_or_hanging_files_costs_at_most_its_budget(tmp_path: Path, prep, monkeypatch,
                                                                    caplog) -> None:
    """Slow files each under ``--decode-timeout`` but together over ``--series-timeout``: the series is
    ``series_timeout``. Hanging files are timed out one by one only while the series' budget lasts."""
    a = tmp_path / "archive"
    slow = volume_series(a / "slow", n=6, rows=8, cols=8, seed=1, name=lambda k: f"slow{k}")
    hangs = volume_series(a / "hangs", n=6, rows=8, cols=8, seed=2, name=lambda k: f"hang{k}")
    fine = volume_series(a / "fine", n=3, rows=8, cols=8, seed=3)
    real = data_prep.build.read_dicom_frames

    def read(path, frames, rows, columns):  # runs in the worker
        name = os.path.basename(path)
        if name.startswith("slow"):
            time.sleep(0.4)  # 6 x 0.4 s: each well under 1 s, together over 1.5 s
        if name.startswith("hang"):
            time.sleep(600)
        return real(path, frames, rows, columns)

    monkeypatch.setattr(data_prep.build, "read_dicom_frames", read)
    caplog.set_level(logging.WARNING, logger="data_prep")

    run: PrepRun = prep(a, workers=1, decode_timeout=1.0, series_timeout=1.5)

    assert [run.reason(p) for p in slow.paths] == [Reason.SERIES_TIMEOUT] * 6  # no file is blamed
    hang_reasons = [run.reason(p) for p in hangs.paths]
    # the first hang costs over 1 s of the 1.5 s budget and the second attempt runs out of it: one file
    # is timed out (two where the supervisor wakes a second late); the rest of the series is series_timeout
    blamed = hang_reasons.count(Reason.PIXEL_DECODE_FAILED)
    assert 1 <= blamed <= 2 and hang_reasons.count(Reason.SERIES_TIMEOUT) == 6 - blamed, hang_reasons
    assert run.row(fine.paths[0]).shape[0] == 3
    assert run.summary.rejects == {"pixel_decode_failed": blamed, "series_timeout": 12 - blamed}
    files = [p for p in a.rglob("*") if p.is_file()]
    assert run.report["files_seen"] == len(files) == 15
    assert run.report["files_in_built_series"] + run.report["files_rejected"] == len(files)
    assert "series_timeout (building the series took longer than 1.5 s)" in caplog.text
    assert str(a) not in caplog.text
    assert len(run.manifest.rows) == 1
