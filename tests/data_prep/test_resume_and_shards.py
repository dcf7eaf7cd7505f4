"""Atomic, resumable, shardable: a killed run finishes on rerun with the bytes of an uninterrupted one."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from data_prep import PrepError, merge_shards, prep_archive
from data_prep.deid import split_of
from data_prep.pipeline import KILL_AFTER_ENV
from medmae.data.cache import MANIFEST_NAME, REJECT_REPORT_NAME, built_series_ids
from tests.data_prep.factory import (
    BASIC_TEXT_SR,
    Identity,
    cr_image,
    non_image,
    truncate,
    volume_series,
    write_nifti,
    write_sidecar,
)

REPO = Path(__file__).resolve().parents[2]
OUTPUTS = (MANIFEST_NAME, REJECT_REPORT_NAME)


def make_archive(root: Path, n_series: int = 6, n_slices: int = 4, size: int = 16) -> Path:
    for i in range(n_series):
        volume_series(root / f"s{i}", n=n_slices, rows=size, cols=size, seed=100 + i,
                      identity=Identity(patient_id=f"P{i % 4}"))
    truncate(volume_series(root / "trunc", n=4, rows=size, cols=size, seed=99).paths[3])
    cr_image(root / "cr" / "x")
    non_image(root / "sr" / "r", BASIC_TEXT_SR, "SR")
    (root / "junk.txt").write_text("junk")
    # NIfTI with sidecars: built (the sidecar in its series), rejected at build, rejected at scan
    write_sidecar(write_nifti(root / "nifti" / "ct.nii.gz", np.full((4, 4, 3), -1000, np.int16)), {"Modality": "CT"})
    write_sidecar(write_nifti(root / "nifti" / "nan.nii", np.full((4, 4, 3), np.nan, np.float32)), {"Modality": "MR"})
    (root / "nifti" / "junk.nii").write_bytes(b"junk" * 100)
    write_sidecar(root / "nifti" / "junk.nii", {"Modality": "MR"})
    return root


def _cmd(archive: Path, out: Path, salt: Path, workers: int = 1) -> list[str]:
    return [sys.executable, "-m", "data_prep", str(archive), "--out", str(out), "--salt-file", str(salt),
            "--workers", str(workers), "--quiet"]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != KILL_AFTER_ENV}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env.update(extra)
    return env


def _run(cmd: list[str], log: Path, **extra: str) -> int:
    """Run prep in its own session; output goes to a file so no stray process can hold a pipe."""
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, env=_env(**extra), stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            return proc.wait(timeout=240)
        finally:
            try:  # belt and braces: nothing of that session may outlive the test
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """An archive, its salt, and an uninterrupted run's cache."""
    root = tmp_path_factory.mktemp("resume")
    archive = make_archive(root / "archive")
    salt = root / "prep.salt"
    ref = root / "ref"
    prep_archive([archive], ref, salt_file=salt, progress=False)
    return archive, salt, ref


def test_sigkill_mid_build_then_rerun_gives_identical_outputs(reference, tmp_path: Path) -> None:
    """The process SIGKILLs itself after 2 built series (worker pool running): no cleanup at all."""
    archive, salt, ref = reference
    out = tmp_path / "cache"
    code = _run(_cmd(archive, out, salt, workers=2), tmp_path / "log", **{KILL_AFTER_ENV: "2"})
    assert code == -signal.SIGKILL, (tmp_path / "log").read_text()
    assert not (out / MANIFEST_NAME).exists()  # no manifest: nothing half-done is visible
    partial = built_series_ids(out)
    assert 2 <= len(partial) < len(built_series_ids(ref))
    summary = prep_archive([archive], out, salt_file=salt, workers=2, progress=False)
    assert summary.series_skipped >= 2
    for name in OUTPUTS:
        assert (out / name).read_bytes() == (ref / name).read_bytes(), name
    assert built_series_ids(out) == built_series_ids(ref)


def test_external_sigkill_after_first_sidecar(reference, tmp_path: Path) -> None:
    """A real kill from outside the process group, mid-build: the run is held after its first series
    (tests/data_prep/held_prep.py), so the kill lands between series on any machine."""
    archive, salt, ref = reference
    out = tmp_path / "cache"
    cmd = [sys.executable, "-m", "tests.data_prep.held_prep", *_cmd(archive, out, salt)[3:]]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not built_series_ids(out) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.001)
        assert proc.poll() is None, f"prep ended (status {proc.returncode}) before the kill"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    # the kill landed mid-build: one series written of the reference's, nothing final
    assert len(built_series_ids(out)) == 1 < len(built_series_ids(ref))
    assert not (out / MANIFEST_NAME).exists() and not (out / REJECT_REPORT_NAME).exists()
    summary = prep_archive([archive], out, salt_file=salt, progress=False)
    assert summary.series_skipped == 1
    for name in OUTPUTS:
        assert (out / name).read_bytes() == (ref / name).read_bytes(), name
    assert _series_bytes(out) == _series_bytes(ref)


def _series_bytes(cache: Path) -> dict[str, bytes]:
    """Every array and sidecar of a cache, by name."""
    return {p.name: p.read_bytes() for p in sorted((cache / "series").iterdir())}


def test_rerun_skips_built_series(reference, tmp_path: Path) -> None:
    archive, salt, ref = reference
    out = tmp_path / "cache"
    first = prep_archive([archive], out, salt_file=salt, progress=False)
    mtimes = {p: p.stat().st_mtime_ns for p in (out / "series").glob("*.npy")}
    second = prep_archive([archive], out, salt_file=salt, progress=False)
    assert (second.series_built, second.series_skipped) == (0, first.series_built)
    assert second.rejects == first.rejects and second.rejects.get("pixel_decode_failed") == 1
    assert {p: p.stat().st_mtime_ns for p in (out / "series").glob("*.npy")} == mtimes
    for name in OUTPUTS:
        assert (out / name).read_bytes() == (ref / name).read_bytes()


def test_shards_then_merge_equal_a_single_run(reference, tmp_path: Path) -> None:
    archive, salt, ref = reference
    out = tmp_path / "cache"
    summaries = [prep_archive([archive], out, salt_file=salt, shard=(i, 3), progress=False) for i in range(3)]
    assert all(s.manifest is None and s.shard_partial is not None for s in summaries)
    assert not (out / MANIFEST_NAME).exists()
    assert sum(s.series_built for s in summaries) == len(built_series_ids(ref))
    merged = merge_shards(out)
    assert merged.series_in_manifest == len(built_series_ids(ref))
    for name in OUTPUTS:
        assert (out / name).read_bytes() == (ref / name).read_bytes(), name
    counts = merged.rejects  # NIfTI sidecars are accounted once across shards, with their NIfTI
    assert (counts["sidecar_of_rejected_nifti"], counts["non_finite_values"], counts["nifti_unreadable"]) == (1, 2, 1)
    assert merged.files_in_series + merged.files_rejected == merged.files_seen


def test_merge_refuses_missing_or_mismatched_shards(reference, tmp_path: Path) -> None:
    archive, salt, _ = reference
    out = tmp_path / "cache"
    with pytest.raises(PrepError, match="no shard results"):
        merge_shards(out.parent)
    prep_archive([archive], out, salt_file=salt, shard=(0, 2), progress=False)
    with pytest.raises(PrepError, match=r"missing shard results for shard\(s\) \[1\]"):
        merge_shards(out)
    other_salt = tmp_path / "other.salt"
    with pytest.raises(PrepError, match="built with a salt that is not at"):  # refused before writing
        prep_archive([archive], out, salt_file=other_salt, shard=(1, 2), progress=False)
    # a shard result built elsewhere with another salt, copied in: merge refuses it
    elsewhere = tmp_path / "elsewhere"
    prep_archive([archive], elsewhere, salt_file=other_salt, shard=(1, 2), progress=False)
    for partial in (elsewhere / "prep_state").glob("shard-*.json"):
        shutil.copy(partial, out / "prep_state" / partial.name)
    with pytest.raises(PrepError, match="salt_fingerprint"):
        merge_shards(out)


def test_split_is_deterministic_and_patient_level(reference, tmp_path: Path) -> None:
    archive, salt, _ = reference
    out = tmp_path / "cache"
    prep_archive([archive], out, salt_file=salt, val_fraction=0.5, progress=False)
    import json

    rows = json.loads((out / MANIFEST_NAME).read_text())["series"]
    by_patient: dict[str, set[str]] = {}
    for r in rows:
        by_patient.setdefault(r["patient_id"], set()).add(r["split"])
    assert all(len(s) == 1 for s in by_patient.values())
    assert json.loads((out / MANIFEST_NAME).read_text())["val_fraction"] == 0.5
    assert all(r["split"] == split_of(r["patient_id"], 0.5) for r in rows)
