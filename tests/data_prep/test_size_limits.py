"""Issue 8.2: no header can exhaust memory. Declared sizes are checked against ``--max-voxels`` and
against the bytes present before anything is decoded or allocated; each case is a counted reason."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data_prep import Reason
from data_prep.scan import DEFAULT_MAX_VOXELS, scan_file
from tests.data_prep.factory import enhanced_mr, volume_series
from tests.data_prep.hostile import frames_claiming, nifti_gz_claiming, rle_claiming

REPO = Path(__file__).resolve().parents[2]


def test_rle_file_claiming_65535_squared(tmp_path: Path, prep, caplog) -> None:
    bad = rle_claiming(tmp_path / "archive" / "huge_rle", 65535, 65535)
    assert bad.stat().st_size < 10_000
    assert scan_file(str(bad), "0/x").reason == Reason.TOO_LARGE  # 4.3e9 voxels > 2**28
    assert prep(tmp_path / "archive").reason(bad) == Reason.TOO_LARGE
    # with the cap lifted, the bytes present still refuse it before the decoder allocates 8.6 GB
    caplog.set_level(logging.WARNING, logger="data_prep")
    run = prep(tmp_path / "archive", max_voxels=2**40)
    assert run.reason(bad) == Reason.PIXEL_DECODE_FAILED
    assert "bytes of RLE data cannot hold" in caplog.text


def test_enhanced_file_claiming_2_31_frames_costs_nothing(tmp_path: Path, prep) -> None:
    good = enhanced_mr(tmp_path / "src" / "mf")
    bad = frames_claiming(good.paths[0], tmp_path / "archive" / "frames", 2**31 - 1)
    t0 = time.monotonic()
    assert scan_file(str(bad), "0/x").reason == Reason.TOO_LARGE
    # even with no cap at all the scan never loops over the frames the header claims
    assert scan_file(str(bad), "0/x", max_voxels=2**62).reason == Reason.SIZE_MISMATCH
    assert time.monotonic() - t0 < 5
    run = prep(tmp_path / "archive", max_voxels=2**62)
    assert run.reason(bad) == Reason.SIZE_MISMATCH


def test_nifti_claiming_1024_1024_512(tmp_path: Path, prep, caplog) -> None:
    bad = nifti_gz_claiming(tmp_path / "archive" / "huge.nii.gz", (1024, 1024, 512), payload=os.urandom(1 << 16))
    assert 1024 * 1024 * 512 > DEFAULT_MAX_VOXELS
    assert scan_file(str(bad), "0/x").reason == Reason.TOO_LARGE
    # cap lifted: 64 KiB of gzip data cannot inflate to the 1 GiB declared; refused before nibabel allocates
    caplog.set_level(logging.WARNING, logger="data_prep")
    run = prep(tmp_path / "archive", max_voxels=2**30)
    assert run.reason(bad) == Reason.PIXEL_DECODE_FAILED
    assert "bytes of gzip data cannot hold" in caplog.text


def test_uncompressed_nifti_shorter_than_its_header(tmp_path: Path, prep) -> None:
    import nibabel as nib
    import numpy as np

    path = tmp_path / "archive" / "short.nii"
    path.parent.mkdir(parents=True)
    nib.save(nib.Nifti1Image(np.ones((20, 20, 20), np.int16), np.eye(4)), str(path))
    with open(path, "r+b") as f:
        f.truncate(352 + 1000)
    assert prep(tmp_path / "archive").reason(path) == Reason.PIXEL_DECODE_FAILED


def test_series_larger_than_the_cap_is_rejected_whole(tmp_path: Path, prep) -> None:
    s = volume_series(tmp_path / "archive" / "ct", n=4, rows=32, cols=24)
    small = volume_series(tmp_path / "archive" / "small", n=2, rows=32, cols=24, seed=3)
    run = prep(tmp_path / "archive", max_voxels=32 * 24 * 3)  # each file fits, the 4-slice series does not
    assert [run.reason(p) for p in s.paths] == [Reason.TOO_LARGE] * 4
    assert run.row(small.paths[0]).shape[0] == 2


def test_cli_rejects_a_bad_max_voxels(tmp_path: Path, capsys) -> None:
    from data_prep.cli import main

    (tmp_path / "archive").mkdir()
    assert main([str(tmp_path / "archive"), "--out", str(tmp_path / "c"), "--max-voxels", "0"]) == 2
    assert main([str(tmp_path / "archive"), "--out", str(tmp_path / "c"), "--decode-timeout", "-1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "--max-voxels" in err[0] and "--decode-timeout" in err[1]
    assert not (tmp_path / "c").exists()


# ----------------------------------------------------------------------------- peak memory (slow)


def _peak_rss_mib(archive: Path, out: Path, *extra: str) -> tuple[int, float]:
    """Run ``python -m data_prep`` and return (exit status, peak RSS of it and its workers in MiB)."""
    code = (
        "import resource, subprocess, sys\n"
        "rc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode\n"
        "print(rc, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)\n"
    )
    cmd = [sys.executable, "-c", code, sys.executable, "-m", "data_prep", str(archive), "--out", str(out),
           "--workers", "2", "--quiet", *extra]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, check=True)
    rc, peak = res.stdout.split()
    return int(rc), float(peak)


@pytest.mark.slow
def test_huge_claims_are_rejected_in_bounded_memory(tmp_path: Path) -> None:
    """The three attacks of issue 8 (8.4 GB, unbounded, 2.2 GB before): each well under 600 MiB."""
    good = enhanced_mr(tmp_path / "src" / "mf")
    cases = {
        "rle": (rle_claiming(tmp_path / "rle" / "huge_rle", 65535, 65535), ()),
        "rle_uncapped": (rle_claiming(tmp_path / "rle_uncapped" / "huge_rle", 65535, 65535),
                         ("--max-voxels", str(2**40))),
        "frames": (frames_claiming(good.paths[0], tmp_path / "frames" / "mf", 2**31 - 1), ()),
        "frames_uncapped": (frames_claiming(good.paths[0], tmp_path / "frames_uncapped" / "mf", 2**31 - 1),
                            ("--max-voxels", str(2**62))),
        # a real 1 GiB volume of zeros in ~1 MB of gzip: only the cap can refuse it
        "nifti": (nifti_gz_claiming(tmp_path / "nifti" / "zeros.nii.gz", (1024, 1024, 512),
                                    zero_bytes=2 * 1024 * 1024 * 512, compresslevel=9), ()),
    }
    assert cases["nifti"][0].stat().st_size < 2_000_000
    peaks = {}
    for name, (path, extra) in cases.items():
        rc, peaks[name] = _peak_rss_mib(path.parent, tmp_path / f"cache_{name}", *extra)
        assert rc == 0, name
        report = (tmp_path / f"cache_{name}" / "reject_report.json").read_text()
        assert '"files_rejected": 1' in report, (name, report)
    print(peaks)
    assert max(peaks.values()) < 600, peaks
