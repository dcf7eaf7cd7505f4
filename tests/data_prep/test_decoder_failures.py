"""Issue 8.1: no file stops prep. A decoder that panics (pyo3 ``PanicException``, a BaseException),
aborts the process (segfault-like) or hangs costs that one file, counted ``pixel_decode_failed``
with its pseudonym and cause in the log; the run finishes and every file is accounted for."""

from __future__ import annotations

import faulthandler
import json
import logging
import os
import resource
import time
from pathlib import Path

import pytest

import data_prep.build
from data_prep import Reason, prep_archive
from tests.data_prep.conftest import PrepRun
from tests.data_prep.factory import volume_series
from tests.data_prep.hostile import (
    COMPRESSED_GRAYSCALE,
    deflated_mutants,
    j2k_siz_mutants,
    nifti_extension_mutants,
    pixel_mutants,
)
from tests.data_prep.limited_prep import prep_limited


class FakePanic(BaseException):
    """Stands for pyo3's PanicException: derives from BaseException, not Exception."""


def _abort() -> None:
    """Die like a segfaulting decoder: SIGABRT, no core file, no faulthandler dump (pytest enables it)."""
    faulthandler.disable()
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    os.abort()


def _hostile(real):
    """A read_dicom_frames that misbehaves for files named abort*/hang*/panic* (runs in the worker)."""

    def read(path, frames, rows, columns):
        name = os.path.basename(path)
        if name.startswith("abort"):
            _abort()
        if name.startswith("hang"):
            time.sleep(600)
        if name.startswith("panic"):
            raise FakePanic("decoder panicked")
        return real(path, frames, rows, columns)

    return read


def _assert_all_accounted(run: PrepRun, archive: Path) -> None:
    files = [p for p in archive.rglob("*") if p.is_file()]
    assert run.report["files_seen"] == len(files)
    assert run.report["files_in_built_series"] + run.report["files_rejected"] == len(files)
    for p in files:  # each one is either in exactly one built series or rejected with one reason
        if run.reason(p) is None:
            run.row(p)


@pytest.mark.parametrize("workers", [1, 2])
def test_crash_hang_and_panic_cost_one_file_each(tmp_path: Path, prep, monkeypatch, caplog, workers: int) -> None:
    a = tmp_path / "archive"
    aborts = volume_series(a / "aborts", n=5, seed=1, name=lambda k: "abort" if k == 4 else f"IM{k}")
    hangs = volume_series(a / "hangs", n=5, seed=2, name=lambda k: "hang" if k == 0 else f"IM{k}")
    panics = volume_series(a / "panics", n=4, seed=3, name=lambda k: "panic" if k == 3 else f"IM{k}")
    alone = volume_series(a / "alone", n=1, seed=4, name=lambda k: "abort_alone")
    dies_later = volume_series(a / "later", n=2, seed=5)  # its worker dies after decoding: build_failed
    monkeypatch.setattr(data_prep.build, "read_dicom_frames", _hostile(data_prep.build.read_dicom_frames))
    real_stats = data_prep.build.compute_stats

    def stats(array):
        if array.shape[0] == 2:
            _abort()
        return real_stats(array)

    monkeypatch.setattr(data_prep.build, "compute_stats", stats)
    caplog.set_level(logging.WARNING, logger="data_prep")

    run = prep(a, workers=workers, decode_timeout=1.0)

    for bad in (aborts.paths[4], hangs.paths[0], panics.paths[3], alone.paths[0]):
        assert run.reason(bad) == Reason.PIXEL_DECODE_FAILED
    assert [run.reason(p) for p in dies_later.paths] == [Reason.BUILD_FAILED] * 2
    assert run.row(aborts.paths[0]).shape[0] == 4  # the top slice went, the stack stayed valid
    assert run.row(hangs.paths[1]).shape[0] == 4
    assert run.row(panics.paths[0]).shape[0] == 3
    assert run.summary.rejects == {"build_failed": 2, "pixel_decode_failed": 4}
    _assert_all_accounted(run, a)
    log = caplog.text  # one line per file: its pseudonym and the cause, never its path
    assert "SIGABRT" in log and "longer than 1 s" in log and "FakePanic" in log
    assert str(a) not in log
    # a rerun resumes: the same report, the same bytes
    before = (run.out / "reject_report.json").read_bytes()
    prep_archive([a], run.out, workers=workers, decode_timeout=1.0, progress=False)
    assert (run.out / "reject_report.json").read_bytes() == before


@pytest.mark.parametrize("workers", [1, 2])
def test_rle_pixel_mutants_that_panic_the_real_decoder(tmp_path: Path, prep, caplog, workers: int) -> None:
    """pylibjpeg-rle panics (pyo3 PanicException) on some corrupted RLE data: 12 mutants, fixed seed."""
    a = tmp_path / "archive"
    mutants = pixel_mutants(a, "MR_small_RLE.dcm", n=12, seed=0)
    caplog.set_level(logging.WARNING, logger="data_prep")
    run = prep(a, workers=workers)
    _assert_all_accounted(run, a)
    reasons = {run.reason(p) for p in mutants}
    assert reasons <= {None, Reason.PIXEL_DECODE_FAILED, Reason.NON_FINITE_VALUES}
    assert "PanicException" in caplog.text  # the seed is chosen so that the real decoder panics


@pytest.mark.slow
def test_fuzz_200_pixel_mutants_across_compressed_syntaxes(tmp_path: Path, prep, caplog) -> None:
    a = tmp_path / "archive"
    mutants = []
    for i, source in enumerate(COMPRESSED_GRAYSCALE):
        mutants += pixel_mutants(a / Path(source).stem, source, n=20, seed=100 + i)
    caplog.set_level(logging.WARNING, logger="data_prep")
    run = prep(a, workers=2, decode_timeout=10)  # one JPEG-LS mutant (seed 105, #3) hangs its decoder
    assert len(mutants) == 200
    _assert_all_accounted(run, a)
    counts = run.report["counts"]
    # size_mismatch: a mutated SIZ / SOF marker now disagrees with Rows x Columns (refused before decoding)
    assert set(counts) <= {"pixel_decode_failed", "non_finite_values", "build_failed", "size_mismatch"}, counts
    assert counts.get("pixel_decode_failed", 0) >= 10 and run.report["series_in_manifest"] >= 10
    print(json.dumps(counts), sum(1 for p in mutants if run.reason(p) is None), "built")


@pytest.mark.slow
def test_fuzz_deflated_j2k_codestream_and_nifti_extension_mutants(tmp_path: Path) -> None:
    """Issue 18: deflate streams (junk past the budget, corrupt, cut), JPEG 2000 SIZ markers and NIfTI
    header extensions (claims, vox_offset), mutated at random. Prep runs under an address-space limit:
    every file is accounted for, nothing is build_failed, and memory stays flat."""
    a = tmp_path / "archive"
    source = volume_series(tmp_path / "src", n=1, rows=64, cols=48).paths[0]
    deflated = deflated_mutants(a / "deflated", source, n=30, seed=18)
    j2k = j2k_siz_mutants(a / "j2k", n=40, seed=19)
    nifti = nifti_extension_mutants(a / "nifti", n=40, seed=20)
    run = prep_limited(a, tmp_path / "cache", "--allow-secondary", "--decode-timeout", "20")
    assert run.rc == 0
    r = run.report
    assert r["files_seen"] == len(deflated) + len(j2k) + len(nifti)
    assert r["files_in_built_series"] + r["files_rejected"] == r["files_seen"]
    assert not {"build_failed", "series_timeout"} & set(r["counts"]), r["counts"]
    reasons = {name: [run.reason(p) for p in paths] for name, paths in
               (("deflated", deflated), ("j2k", j2k), ("nifti", nifti))}
    assert Reason.TOO_LARGE in reasons["deflated"] and None in reasons["deflated"], reasons["deflated"]
    assert Reason.SIZE_MISMATCH in reasons["j2k"] and None in reasons["j2k"], reasons["j2k"]
    assert None in reasons["nifti"], reasons["nifti"]
    print(json.dumps(r["counts"]), {k: sum(v is None for v in vs) for k, vs in reasons.items()}, "built",
          f"peak {run.peak_mib:.0f} MiB")
    assert run.peak_mib < 600, run.peak_mib


def test_a_full_disk_stops_the_run_with_one_line(tmp_path: Path, monkeypatch, capsys) -> None:
    """Machine problems are not a file's fault: the run stops (exit 1, one line) and a rerun resumes."""
    import errno

    from data_prep.cli import main

    a = tmp_path / "archive"
    volume_series(a / "ct", n=3)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    real = data_prep.build.write_series
    monkeypatch.setattr(data_prep.build, "write_series", full)  # runs in the forked worker
    assert main([str(a), "--out", str(tmp_path / "cache"), "--quiet"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No space left on device" in err[0] and "rerun to resume" in err[0]
    assert not (tmp_path / "cache" / "manifest.json").exists()
    monkeypatch.setattr(data_prep.build, "write_series", real)
    assert main([str(a), "--out", str(tmp_path / "cache"), "--quiet"]) == 0
