"""File recognition by content and the walk: every file gets one record, nothing raises."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from data_prep import prep_archive
from data_prep.reasons import Reason
from data_prep.scan import scan_archives, scan_file, sniff_dicom, walk
from tests.data_prep.factory import PYDICOM_FILES, volume_series
from tests.data_prep.unprivileged import run_unprivileged, world_readable_tmpdir


def test_sniff_recognises_part10_bare_datasets_and_refuses_text() -> None:
    assert sniff_dicom((PYDICOM_FILES / "CT_small.dcm").read_bytes()[:132]) == "part10"
    assert sniff_dicom((PYDICOM_FILES / "ExplVR_LitEndNoMeta.dcm").read_bytes()[:132]) == "raw"
    assert sniff_dicom((PYDICOM_FILES / "ExplVR_BigEndNoMeta.dcm").read_bytes()[:132]) == "raw"
    assert sniff_dicom(b"Hello, this is a text file that is long enough to be sniffed" * 3) is None
    assert sniff_dicom(b"\x08\x00") is None


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"", Reason.EMPTY_FILE),
        (b"plain text\n" * 50, Reason.NOT_RECOGNISED),
        (b"\x08\x00\x05\x00" + b"\xff" * 300, Reason.NOT_RECOGNISED),  # a lucky first tag, then garbage
    ],
)
def test_scan_file_rejects(tmp_path: Path, content: bytes, reason: Reason) -> None:
    p = tmp_path / "f"
    p.write_bytes(content)
    assert scan_file(str(p), "0/f").reason == reason


def test_dicomdir_by_name_and_by_sop_class(tmp_path: Path) -> None:
    by_name = shutil.copy(PYDICOM_FILES / "dicomdirtests" / "DICOMDIR", tmp_path / "DICOMDIR")
    by_class = shutil.copy(PYDICOM_FILES / "dicomdirtests" / "DICOMDIR-implicit", tmp_path / "index.bin")
    assert scan_file(str(by_name), "0/a").reason == Reason.DICOMDIR
    assert scan_file(str(by_class), "0/b").reason == Reason.DICOMDIR


def test_burned_in_annotation_is_refused(tmp_path: Path) -> None:
    s = volume_series(tmp_path, n=1, extra=lambda ds, k: setattr(ds, "BurnedInAnnotation", "YES"))
    assert scan_file(str(s.paths[0]), "0/x").reason == Reason.BURNED_IN_ANNOTATION


def test_broken_symlink_is_an_unreadable_file(tmp_path: Path) -> None:
    os.symlink(tmp_path / "missing", tmp_path / "link")
    assert scan_file(str(tmp_path / "link"), "0/link").reason == Reason.UNREADABLE_FILE


def test_file_without_read_permission() -> None:
    work = world_readable_tmpdir()
    try:
        s = volume_series(work, n=1)
        os.chmod(s.paths[0], 0)
        assert run_unprivileged(lambda: scan_file(str(s.paths[0]), "0/x").reason) == Reason.UNREADABLE_FILE
    finally:
        shutil.rmtree(work)


def test_folder_without_read_permission_is_counted_and_the_rest_is_built() -> None:
    work = world_readable_tmpdir()
    try:
        volume_series(work / "archive" / "ok", n=3)
        volume_series(work / "archive" / "locked", n=3)
        os.chmod(work / "archive" / "locked", 0)
        (work / "out").mkdir()
        (work / "out").chmod(0o777)

        def prep() -> tuple[int, dict[str, int]]:
            summary = prep_archive([work / "archive"], work / "out" / "cache", salt_file=work / "out" / "salt",
                                   progress=False)
            return summary.series_built, summary.rejects

        built, rejects = run_unprivileged(prep)
        assert built == 1 and rejects == {Reason.UNREADABLE_DIRECTORY.value: 1}
    finally:
        os.chmod(work / "archive" / "locked", 0o755)
        shutil.rmtree(work)


def test_header_records_keep_geometry_in_memory(tmp_path: Path) -> None:
    s = volume_series(tmp_path, n=1, origin=(1.5, -2.0, 7.25), pixel_spacing=(0.6, 0.9))
    r = scan_file(str(s.paths[0]), "0/IM")
    assert r.kind == "dicom" and r.dicom is not None
    f = r.dicom.frames[0]
    assert f.position == (1.5, -2.0, 7.25) and f.pixel_spacing == (0.6, 0.9) and f.intercept == -1024


def test_walk_is_sorted_excludes_the_cache_and_reports_unlistable_folders(tmp_path: Path, monkeypatch) -> None:
    for name in ("b/2", "a/1", "a/0", "cache/x", "locked/y"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    real = os.scandir

    def scandir(path=".", *a, **k):  # what the kernel says to a normal user for chmod 000
        if os.path.basename(os.fspath(path)) == "locked":
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real(path, *a, **k)

    monkeypatch.setattr(os, "scandir", scandir)
    entries = [(rel, why) for _, rel, why in walk([tmp_path], exclude=[tmp_path / "cache"])]
    assert entries == [("0/a/0", None), ("0/a/1", None), ("0/b/2", None), ("0/locked", Reason.UNREADABLE_DIRECTORY)]


@pytest.mark.parametrize("workers", [1, 2])
def test_scan_archives_one_record_per_file(workers: int) -> None:
    records = scan_archives([PYDICOM_FILES / "dicomdirtests"], workers=workers)
    n_files = sum(len(fs) for _, _, fs in os.walk(PYDICOM_FILES / "dicomdirtests"))
    assert len(records) == n_files == len({r.rel for r in records})
    assert [r.rel for r in records] == sorted(r.rel for r in records)
