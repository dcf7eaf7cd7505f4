"""Incremental prep: a rerun on a grown or shrunk archive gives exactly a fresh prep's cache.

Every test compares, byte for byte, the manifest, the reject report, every array and sidecar and
the per-series build state of the incrementally updated cache with a fresh prep of the new archive
under the same salt, and checks the new / updated / unchanged / removed counts.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data_prep import merge_shards, prep_archive
from data_prep.deid import Pseudonymizer
from data_prep.pipeline import KILL_AFTER_ENV
from data_prep.report import ManifestChanges
from data_prep.state import pending_removal_path
from medmae.data.cache import MANIFEST_NAME, REJECT_REPORT_NAME, built_series_ids, load_manifest
from tests.data_prep.factory import Identity, cr_image, volume_series, write_nifti, write_sidecar

REPO = Path(__file__).resolve().parents[2]


def snapshot(cache: Path) -> dict[str, bytes]:
    """Everything a reader or a rerun uses: manifest, report, arrays, sidecars, build states."""
    files = {name: (cache / name).read_bytes() for name in (MANIFEST_NAME, REJECT_REPORT_NAME)}
    for folder in (cache / "series", cache / "prep_state" / "series", cache / "prep_state" / "dropped"):
        if folder.is_dir():
            files.update({f"{folder.name}/{p.name}": p.read_bytes() for p in sorted(folder.iterdir())
                          if not p.name.startswith(".")})
    return files


def assert_same_cache(cache: Path, reference: Path) -> None:
    got, want = snapshot(cache), snapshot(reference)
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name] == want[name], name


class Archive:
    """A small archive that can grow: three CT series (one of them first with only 4 of its 6
    slices), a CR image, a NIfTI with a sidecar, and junk; each series has its own patient."""

    def __init__(self, root: Path) -> None:
        self.root = root / "archive"
        self.staging = root / "staging"
        for i, name in enumerate(("a", "b")):
            volume_series(self.root / name, n=4, rows=16, cols=16, seed=10 + i, identity=Identity(patient_id=f"P{i}"))
        self.growing = volume_series(self.staging / "c", n=6, rows=16, cols=16, seed=20,
                                     identity=Identity(patient_id="P2"))
        (self.root / "c").mkdir()
        for p in self.growing.paths[:4]:
            shutil.copy2(p, self.root / "c" / p.name)
        cr_image(self.root / "cr" / "x", identity=Identity(patient_id="P3"))
        write_sidecar(write_nifti(self.root / "nifti" / "ct.nii.gz", np.full((4, 4, 3), -1000, np.int16)),
                      {"Modality": "CT"})
        (self.root / "junk.txt").write_text("junk")

    def add_series(self) -> None:
        volume_series(self.root / "d", n=3, rows=16, cols=16, seed=30, identity=Identity(patient_id="P4"))

    def add_instances(self) -> None:
        for p in self.growing.paths[4:]:
            shutil.copy2(p, self.root / "c" / p.name)


@pytest.fixture
def grown(tmp_path: Path) -> tuple[Archive, Path, Path]:
    """(archive, salt, cache built from the archive before it changes)."""
    archive = Archive(tmp_path)
    salt = tmp_path / "prep.salt"
    cache = tmp_path / "cache"
    first = prep(archive, cache, salt)
    assert first.changes == ManifestChanges(new=first.series_in_manifest, updated=0, unchanged=0, removed=0)
    return archive, salt, cache


def prep(archive: Archive, out: Path, salt: Path, **kwargs):
    return prep_archive([archive.root], out, salt_file=salt, progress=False, **kwargs)


def fresh(archive: Archive, salt: Path, tmp_path: Path, name: str = "fresh") -> Path:
    out = tmp_path / name
    prep(archive, out, salt)
    return out


def test_rerun_after_adding_a_series_builds_only_it(grown, tmp_path: Path) -> None:
    archive, salt, cache = grown
    before = {p.name: p.stat().st_mtime_ns for p in (cache / "series").glob("*.npy")}
    archive.add_series()
    summary = prep(archive, cache, salt)
    assert (summary.series_built, summary.series_skipped) == (1, len(before))
    assert summary.changes == ManifestChanges(new=1, updated=0, unchanged=len(before), removed=0)
    assert "manifest vs previous: 1 new, 0 updated" in summary.format()
    assert {n: m for n, m in ((p.name, p.stat().st_mtime_ns) for p in (cache / "series").glob("*.npy"))
            if n in before} == before  # nothing else rewritten
    assert_same_cache(cache, fresh(archive, salt, tmp_path))


def test_rerun_after_adding_instances_rebuilds_that_series(grown, tmp_path: Path) -> None:
    archive, salt, cache = grown
    old = {r.series_id: r for r in load_manifest(cache).rows}
    archive.add_instances()
    summary = prep(archive, cache, salt)
    assert (summary.series_built, summary.series_skipped) == (1, len(old) - 1)
    assert summary.changes == ManifestChanges(new=0, updated=1, unchanged=len(old) - 1, removed=0)
    rows = {r.series_id: r for r in load_manifest(cache).rows}
    (changed,) = [sid for sid in rows if rows[sid] != old[sid]]
    assert (old[changed].shape[0], rows[changed].shape[0]) == (4, 6)
    assert_same_cache(cache, fresh(archive, salt, tmp_path))


def test_rerun_after_deleting_a_series_removes_it(grown, tmp_path: Path) -> None:
    archive, salt, cache = grown
    n = len(load_manifest(cache).rows)
    shutil.rmtree(archive.root / "b")
    summary = prep(archive, cache, salt)
    assert (summary.series_built, summary.series_skipped) == (0, n - 1)
    assert summary.changes == ManifestChanges(new=0, updated=0, unchanged=n - 1, removed=1)
    assert_same_cache(cache, fresh(archive, salt, tmp_path))  # its array, sidecar and state are gone too


def test_keep_missing_keeps_a_deleted_series_until_a_plain_rerun(grown, tmp_path: Path) -> None:
    archive, salt, cache = grown
    old = load_manifest(cache).rows
    shutil.rmtree(archive.root / "b")
    summary = prep(archive, cache, salt, keep_missing=True)
    assert summary.changes == ManifestChanges(new=0, updated=0, unchanged=len(old), removed=0, kept_missing=1)
    assert load_manifest(cache).rows == old and built_series_ids(cache) == sorted(r.series_id for r in old)
    summary = prep(archive, cache, salt)
    assert summary.changes is not None and summary.changes.removed == 1
    assert_same_cache(cache, fresh(archive, salt, tmp_path))


def test_a_series_whose_files_stay_is_not_missing(grown, tmp_path: Path) -> None:
    """Files still in the archive but no longer a buildable series (here: a gap in the stack) are
    rejected, not "missing": --keep-missing does not keep the stale series."""
    archive, salt, cache = grown
    archive.add_instances()
    (archive.root / "c" / archive.growing.paths[3].name).unlink()  # slice 3 of 0..5 gone: a gap
    summary = prep(archive, cache, salt, keep_missing=True)
    assert summary.changes is not None and (summary.changes.removed, summary.changes.kept_missing) == (1, 0)
    assert summary.rejects.get("missing_slices") == 5
    assert_same_cache(cache, fresh(archive, salt, tmp_path))


def test_nifti_with_new_content_is_rebuilt_and_an_unchanged_one_is_not_reread(grown, tmp_path, monkeypatch) -> None:
    archive, salt, cache = grown
    reads: list[str] = []
    content = Pseudonymizer.content
    monkeypatch.setattr(Pseudonymizer, "content", lambda self, path, *a: reads.append(path) or content(self, path, *a))
    assert prep(archive, cache, salt).series_built == 0
    assert reads == []  # unchanged NIfTI: its stored stat matched, its bytes were not hashed again
    write_nifti(archive.root / "nifti" / "ct.nii.gz", np.full((4, 4, 3), 40, np.int16))  # same shape, new values
    summary = prep(archive, cache, salt)
    assert len(reads) == 1 and summary.series_built == 1
    assert summary.changes is not None and summary.changes.updated == 1
    assert_same_cache(cache, fresh(archive, salt, tmp_path))


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != KILL_AFTER_ENV}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env.update(extra)
    return env


def test_sigkill_during_an_incremental_rerun_then_rerun(grown, tmp_path: Path) -> None:
    """SIGKILL after the first series of an incremental rerun (2 workers: the other may be mid-rebuild),
    then a rerun: the cache of a fresh prep of the new archive, and the counts of an undisturbed rerun."""
    archive, salt, cache = grown
    old = load_manifest(cache).rows
    archive.add_series()
    archive.add_instances()
    write_nifti(archive.root / "nifti" / "ct.nii.gz", np.full((4, 4, 3), 40, np.int16))
    shutil.rmtree(archive.root / "a")
    cmd = [sys.executable, "-m", "data_prep", str(archive.root), "--out", str(cache), "--salt-file", str(salt),
           "--workers", "2", "--quiet"]
    with open(tmp_path / "log", "wb") as log:
        proc = subprocess.Popen(cmd, env=_env(**{KILL_AFTER_ENV: "1"}), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            code = proc.wait(timeout=240)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert code == -signal.SIGKILL, (tmp_path / "log").read_text()
    assert load_manifest(cache).rows == old  # the previous manifest is still the one published
    summary = prep(archive, cache, salt)
    assert summary.changes == ManifestChanges(new=1, updated=2, unchanged=len(old) - 3, removed=1)
    assert_same_cache(cache, fresh(archive, salt, tmp_path))


def test_a_crash_between_manifest_swap_and_deletion_is_finished_by_the_rerun(grown, tmp_path, monkeypatch) -> None:
    archive, salt, cache = grown
    shutil.rmtree(archive.root / "b")

    def crash(cache_dir: Path, series_id: str) -> None:
        raise OSError("simulated crash after the manifest swap")

    monkeypatch.setattr("data_prep.publish.remove_series", crash)  # the publishing step deletes
    with pytest.raises(OSError, match="simulated"):
        prep(archive, cache, salt)
    assert pending_removal_path(cache).is_file()
    monkeypatch.undo()
    summary = prep(archive, cache, salt)
    assert summary.changes is not None and summary.changes.removed == 0  # the manifest had already dropped it
    assert not pending_removal_path(cache).exists()
    assert_same_cache(cache, fresh(archive, salt, tmp_path))


def test_shards_and_merge_on_a_changed_archive(grown, tmp_path: Path) -> None:
    archive, salt, cache = grown
    old = load_manifest(cache).rows
    archive.add_series()
    archive.add_instances()
    shutil.rmtree(archive.root / "b")
    for i in range(2):
        part = prep(archive, cache, salt, shard=(i, 2))
        assert part.changes is None and part.manifest is None
    merged = merge_shards(cache)
    assert merged.changes == ManifestChanges(new=1, updated=1, unchanged=len(old) - 2, removed=1)
    reference = fresh(archive, salt, tmp_path)
    for name in (MANIFEST_NAME, REJECT_REPORT_NAME):
        assert (cache / name).read_bytes() == (reference / name).read_bytes(), name
    series = {p.name: p.read_bytes() for p in (cache / "series").iterdir()}
    assert series == {p.name: p.read_bytes() for p in (reference / "series").iterdir()}


def test_a_resumed_training_run_refuses_a_changed_cache(grown, caplog) -> None:
    from medmae.data import CacheChangedError, CacheDataModule

    archive, salt, cache = grown

    def datamodule(**kwargs) -> CacheDataModule:
        return CacheDataModule(str(cache), img_size=16, batch_size=2, num_workers=0, selection={"min_size": 4},
                               loader={"pin_memory": False}, **kwargs)

    dm = datamodule()
    dm.setup("fit")
    checkpoint = dm.state_dict()
    assert checkpoint["manifest_version"] == load_manifest(cache).version and len(checkpoint["manifest_version"]) == 16
    resumed = datamodule()
    resumed.load_state_dict(checkpoint)
    resumed.setup("fit")  # same cache: resumes
    archive.add_instances()
    prep(archive, cache, salt)
    assert load_manifest(cache).version != checkpoint["manifest_version"]
    for setup_first in (False, True):  # Lightning sets up before it restores the checkpoint
        dm = datamodule()
        with pytest.raises(CacheChangedError, match="cache_changed: warn"):
            if setup_first:
                dm.setup("fit")
                dm.load_state_dict(checkpoint)
            else:
                dm.load_state_dict(checkpoint)
                dm.setup("fit")
    lenient = datamodule(cache_changed="warn")
    lenient.load_state_dict(checkpoint)
    lenient.setup("fit")
    assert lenient.manifest_version == load_manifest(cache).version
    assert "does not continue the same data stream" in caplog.text
    with pytest.raises(ValueError, match="cache_changed"):
        datamodule(cache_changed="ignore")


def test_ddp_ranks_that_read_different_manifests_stop_together(grown) -> None:
    """Rank 0 broadcasts its version; a rank that read another one makes every rank refuse."""
    from types import SimpleNamespace

    from medmae.data import CacheChangedError, CacheDataModule

    _, _, cache = grown
    decisions: list[bool] = []

    def strategy(rank0_version: str) -> SimpleNamespace:
        def reduce(ok: bool, all: bool = True) -> bool:  # noqa: A002 - Lightning's keyword
            decisions.append(ok)
            return ok

        return SimpleNamespace(broadcast=lambda obj, src=0: rank0_version, reduce_boolean_decision=reduce)

    version = load_manifest(cache).version
    for rank0, ok in ((version, True), ("0123456789abcdef", False)):
        dm = CacheDataModule(str(cache), img_size=16, batch_size=2, num_workers=0, selection={"min_size": 4},
                             loader={"pin_memory": False})
        dm.trainer = SimpleNamespace(world_size=2, strategy=strategy(rank0), global_rank=1)
        if ok:
            dm.setup("fit")
        else:
            with pytest.raises(CacheChangedError, match="ranks read different manifest versions"):
                dm.setup("fit")
    assert decisions == [True, False]
