"""Issue 8.3: every file is accounted for. Folder symlinks are followed or counted, never lost;
FIFOs and devices are not ``empty_file`` (and never opened); permission denied is ``unreadable_file``
whatever the extension."""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

import numpy as np

from data_prep import Reason, prep_archive
from data_prep.scan import scan_file
from tests.data_prep.factory import volume_series, write_nifti
from tests.data_prep.unprivileged import run_unprivileged, world_readable_tmpdir


def test_folder_symlinks_are_counted_or_followed_never_lost(tmp_path: Path, prep) -> None:
    a = tmp_path / "archive"
    inside = volume_series(a / "real", n=3, seed=1)
    os.symlink(a / "real", a / "alias")  # a second way into a folder of the archive
    os.symlink(a, a / "real" / "loop")  # a loop back to the root
    outside = volume_series(tmp_path / "elsewhere" / "ct", n=3, seed=2)
    os.symlink(tmp_path / "elsewhere", a / "external")  # leads out of the archive
    os.symlink(tmp_path / "elsewhere", a / "real" / "external_again")  # a second link to the same place

    run = prep(a)
    assert run.row(inside.paths[0]).shape[0] == 3  # built once, under its real path
    assert run.report["files_seen"] == 3
    assert run.report["files_in_built_series"] + run.report["files_rejected"] == 3
    assert run.report["directory_links_not_followed"] == 4
    assert run.summary.rejects == {Reason.DIRECTORY_LINK.value: 4}
    assert sorted(Path(p).name for p in run.path_map["directories"].values()) == [
        "alias", "external", "external_again", "loop"]

    followed = prep(a, follow_links=True)
    files = followed.files_of(followed.row(a / "external" / "ct" / outside.paths[0].name))
    assert files == sorted(str(a / "external" / "ct" / p.name) for p in outside.paths)
    assert followed.report["files_seen"] == 6  # the outside series once, not twice
    assert followed.report["directory_links_not_followed"] == 3  # alias, loop, and the second way out


def test_fifo_and_devices_are_never_opened(tmp_path: Path, prep) -> None:
    a = tmp_path / "archive"
    s = volume_series(a / "ct", n=2)
    os.mkfifo(a / "pipe")  # opening it for reading would block the scan forever
    os.mkfifo(a / "pipe.nii.gz")
    os.symlink("/dev/zero", a / "zero")  # endless
    os.symlink("/dev/null", a / "null.nii")
    result: dict = {}
    t = threading.Thread(target=lambda: result.setdefault("run", prep(a)), daemon=True)
    t.start()
    t.join(60)
    assert not t.is_alive(), "prep blocked on a FIFO or a device"
    run = result["run"]
    for name in ("pipe", "pipe.nii.gz", "zero", "null.nii"):
        assert run.reason(a / name) == Reason.NOT_A_REGULAR_FILE, name
    assert run.row(s.paths[0]).shape[0] == 2
    assert run.report["files_seen"] == 6 == run.report["files_in_built_series"] + run.report["files_rejected"]


def test_permission_denied_is_unreadable_for_every_kind_of_file() -> None:
    work = world_readable_tmpdir()
    try:
        nii = write_nifti(work / "scan.nii.gz", np.zeros((4, 4, 3), np.int16))
        plain = write_nifti(work / "scan.nii", np.zeros((4, 4, 3), np.int16))
        dcm = volume_series(work / "ct", n=1).paths[0]
        for p in (nii, plain, dcm):
            os.chmod(p, 0)
        reasons = run_unprivileged(lambda: [scan_file(str(p), "0/x").reason for p in (nii, plain, dcm)])
        assert reasons == [Reason.UNREADABLE_FILE] * 3
    finally:
        shutil.rmtree(work)


def test_unreadable_and_linked_folders_are_reported_apart() -> None:
    work = world_readable_tmpdir()
    try:
        volume_series(work / "archive" / "ok", n=2)
        volume_series(work / "archive" / "locked", n=2, seed=3)
        os.symlink(work / "archive" / "ok", work / "archive" / "alias")
        os.chmod(work / "archive" / "locked", 0)
        (work / "out").mkdir()
        (work / "out").chmod(0o777)

        def run() -> str:
            prep_archive([work / "archive"], work / "out" / "cache", salt_file=work / "out" / "salt", progress=False)
            return (work / "out" / "cache" / "reject_report.json").read_text()

        import json

        report = json.loads(run_unprivileged(run))
        assert report["directories_unreadable"] == 1 and report["directory_links_not_followed"] == 1
        assert report["counts"] == {"directory_link": 1, "unreadable_directory": 1}
    finally:
        os.chmod(work / "archive" / "locked", 0o755)
        shutil.rmtree(work)
