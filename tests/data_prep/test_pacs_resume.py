"""A pull killed (-9) or cut off by its PACS resumes: every failure counted, nothing pulled twice that
was built, the same cache in the end, and no identified DICOM left on disk."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from data_prep import prep_archive
from data_prep.pipeline import KILL_AFTER_ENV
from medmae.data.cache import MANIFEST_NAME, REJECT_REPORT_NAME
from tests.data_prep.orthanc import Orthanc, build_archive, cache_bytes, dicom_files_under, load

REPO = Path(__file__).resolve().parents[2]

pytest_plugins = ("tests.data_prep.orthanc_fixtures",)  # orthanc, credentials


def _prep(spec: str, out: Path, salt: Path, creds: Path, tmpdir: Path, *extra: str,
          env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """``python -m data_prep SOURCE`` in its own process (so it can be killed), temp files in ``tmpdir``."""
    full_env = {**os.environ, "TMPDIR": str(tmpdir), **(env or {})}
    full_env.pop(KILL_AFTER_ENV, None) if env is None or KILL_AFTER_ENV not in env else None
    argv = [sys.executable, "-m", "data_prep", spec, "--out", str(out), "--salt-file", str(salt),
            "--pacs-credentials", str(creds), "--quiet", *extra]
    return subprocess.Popen(argv, cwd=REPO, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_kill_9_mid_pull_then_rerun(orthanc: Orthanc, credentials: Path, tmp_path: Path) -> None:
    archive = build_archive(tmp_path / "written", hostile=False)
    load(orthanc, archive, tmp_path / "files")
    salt, tmpdir = tmp_path / "salt", tmp_path / "tmpdir"
    tmpdir.mkdir()
    reference = prep_archive([tmp_path / "files"], tmp_path / "reference", salt_file=salt, progress=False)
    assert reference.series_in_manifest >= 4

    out = tmp_path / "pulled"
    killed = _prep(orthanc.dicomweb, out, salt, credentials, tmpdir, "--workers", "1",
                   env={KILL_AFTER_ENV: "1"})
    killed.communicate(timeout=120)
    assert killed.returncode == -9
    assert not (out / MANIFEST_NAME).exists()
    assert len(list((out / "series").glob("*.json"))) == 1  # one series built before the kill
    gets_before = len(orthanc.retrievals())
    assert dicom_files_under(tmp_path, skip=(tmp_path / "written", tmp_path / "files", orthanc.root)) == []
    assert list(tmpdir.iterdir()) == []

    rerun = _prep(orthanc.dicomweb, out, salt, credentials, tmpdir, "--workers", "1")
    _, err = rerun.communicate(timeout=120)
    assert rerun.returncode == 0, err
    assert cache_bytes(out) == cache_bytes(tmp_path / "reference")
    assert json.loads((out / REJECT_REPORT_NAME).read_text())["counts"] == \
        json.loads((tmp_path / "reference" / REJECT_REPORT_NAME).read_text())["counts"]
    gets = orthanc.retrievals()
    assert len(gets) > gets_before  # the rerun pulled the rest...
    assert len(gets) == len(set(gets))  # ...and nothing it had already built
    assert dicom_files_under(tmp_path, skip=(tmp_path / "written", tmp_path / "files", orthanc.root)) == []
    assert list(tmpdir.iterdir()) == []


def test_pacs_stopped_mid_pull_is_counted_then_resumed(orthanc: Orthanc, credentials: Path, tmp_path: Path) -> None:
    archive = build_archive(tmp_path / "written", hostile=False)
    load(orthanc, archive, tmp_path / "files")
    salt, tmpdir = tmp_path / "salt", tmp_path / "tmpdir"
    tmpdir.mkdir()
    reference = prep_archive([tmp_path / "files"], tmp_path / "reference", salt_file=salt, progress=False)

    out = tmp_path / "pulled"
    run = _prep(orthanc.dicomweb, out, salt, credentials, tmpdir, "--workers", "1", "--pacs-rate", "4",
                "--pacs-retries", "1")
    deadline = time.monotonic() + 60
    while not orthanc.retrievals() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert orthanc.retrievals(), "the pull never started"
    orthanc.stop()  # SIGKILL: the PACS vanishes mid-pull
    stdout, stderr = run.communicate(timeout=180)
    assert run.returncode == 0, stderr  # the run completes; the failures are counted
    counts = json.loads((out / REJECT_REPORT_NAME).read_text())["counts"]
    assert counts.get("pacs_unreachable", 0) >= 3
    lines = [line for line in stderr.splitlines() if "pacs_unreachable" in line]
    assert lines and all(line.startswith("medmae prep: series s") and "is unreachable" in line for line in lines)
    assert "pacs_unreachable" in stdout  # the summary counts them
    built_before = len(json.loads((out / MANIFEST_NAME).read_text())["series"])
    assert built_before < reference.series_in_manifest

    orthanc.start()  # the PACS is back (same storage, same ports)
    rerun = _prep(orthanc.dicomweb, out, salt, credentials, tmpdir, "--workers", "1")
    _, err = rerun.communicate(timeout=120)
    assert rerun.returncode == 0, err
    assert cache_bytes(out) == cache_bytes(tmp_path / "reference")
    assert "pacs_unreachable" not in (out / REJECT_REPORT_NAME).read_text()
    assert dicom_files_under(tmp_path, skip=(tmp_path / "written", tmp_path / "files", orthanc.root)) == []
    assert list(tmpdir.iterdir()) == []
