"""benchmarks/transfer_cls.py: the focal-lesion generator (default suite, on nibabel's own test scan, no
nilearn), the protocol wiring with stand-in stages, and the whole path in its reduced mode (slow)."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import importlib.util
import json
import shutil
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from data_prep import prep_archive
from medmae.data.cache import load_manifest, open_series_array

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import transfer_cls  # noqa: E402

sys.path.pop(0)

#: a real T1 head scan shipped with nibabel (33 x 41 x 25 voxels of 2 mm): any 3D volume will do
SCAN = Path(nib.__file__).parent / "tests" / "data" / "anatomical.nii"
#: the generator at the scale of that scan (its field of view is 66 x 82 mm)
SMALL = dataclasses.replace(transfer_cls.Task(), fov_mm=(56, 72), depth_mm=2.0, val_patients=4, test_patients=4)


@pytest.fixture(scope="module")
def anatomy() -> transfer_cls.Anatomy:
    img = nib.load(str(SCAN))
    return transfer_cls.Anatomy.of(np.asarray(img.dataobj), img.header.get_zooms()[:3], reference=225.0)


def test_a_patient_is_a_function_of_seed_role_and_index(anatomy: transfer_cls.Anatomy) -> None:
    a = transfer_cls.make_patient(anatomy, SMALL, "val", 3)
    again = transfer_cls.make_patient(anatomy, SMALL, "val", 3)
    assert np.array_equal(a.array, again.array) and np.array_equal(a.affine, again.affine) and a.info == again.info
    assert a.array.dtype == np.int16 and a.array.shape == (*SMALL.fov_mm, SMALL.planes)
    assert np.allclose(np.diag(a.affine)[:3], (1.0, 1.0, SMALL.gap_mm))
    others = [
        transfer_cls.make_patient(anatomy, dataclasses.replace(SMALL, seed=1), "val", 3),
        transfer_cls.make_patient(anatomy, SMALL, "test", 3),
        transfer_cls.make_patient(anatomy, SMALL, "val", 5),
    ]
    for other in others:
        assert not np.array_equal(a.array, other.array)
    # patients differ in more than the finding: pose, level and scanner are drawn per patient
    infos = [transfer_cls.make_patient(anatomy, SMALL, "unlabelled", i).info for i in range(6)]
    for key in ("z_mm", "yaw_deg", "scale", "gain", "noise_sigma"):
        assert len({info[key] for info in infos}) == 6, key


def test_the_lesion_is_in_exactly_the_positive_patients_and_nowhere_else(anatomy: transfer_cls.Anatomy) -> None:
    for role in ("train", "val", "test", "unlabelled"):
        labels = []
        for i in range(6):
            p = transfer_cls.make_patient(anatomy, SMALL, role, i)
            plain = transfer_cls.make_patient(anatomy, SMALL, role, i, lesion=False)
            labels.append(p.label)
            changed = p.array != plain.array
            if p.label:
                # the same patient without the finding differs only inside the lesion, which is brighter
                assert p.lesion_mask.any() and changed.any() and not (changed & ~p.lesion_mask).any()
                assert p.info["lesion"] and 5.0 <= min(p.info["lesion_diameters_mm"][:2])
                assert p.array[changed].astype(float).mean() > plain.array[changed].astype(float).mean()
                assert p.lesion_mask.any(axis=(0, 1)).all()  # every plane of the series cuts the lesion
                assert p.array.max() < np.iinfo(np.int16).max
            else:
                assert not changed.any() and not p.lesion_mask.any() and not p.info["lesion"]
        assert labels == [1, 0] * 3  # half of every cohort


def cache_plane_hashes(cache: Path) -> list[str]:
    """A hash of every plane (``array[z]`` of the cache's (Z, Y, X) arrays) of every series in a cache."""
    out = []
    for row in load_manifest(cache).rows:
        array = open_series_array(cache, row)
        for z in range(array.shape[0]):
            plane = np.asarray(array[z], dtype=np.float64)
            out.append(hashlib.sha256(repr(plane.shape).encode() + plane.tobytes()).hexdigest())
    return out


def prepped(folders: list[Path], work: Path) -> list[str]:
    prep_archive(folders, work / "cache", workers=1, salt_file=work / "salt", val_fraction=0.0, progress=False)
    return cache_plane_hashes(work / "cache")


def test_held_out_patients_never_reach_the_pretraining_archive(anatomy: transfer_cls.Anatomy, tmp_path: Path) -> None:
    cohort = transfer_cls.write_cohort(tmp_path / "work", anatomy, SMALL, labelled=4, unlabelled=6)
    assert [len(cohort.train), len(cohort.val), len(cohort.test), len(cohort.unlabelled)] == [4, 4, 4, 6]
    archive = [p for folder in cohort.archive for p in sorted(folder.glob("*.nii.gz"))]
    assert len(archive) == 10  # the unlabelled patients and the training patients' images
    files = {role: [p for p, _ in getattr(cohort, role)] for role in ("train", "val", "test")}
    hashes = {role: set(transfer_cls.plane_hashes(paths)) for role, paths in files.items()}
    pretraining = set(transfer_cls.plane_hashes(archive))
    assert len(hashes["test"]) == 4 * SMALL.planes
    assert not pretraining & hashes["test"] and not pretraining & hashes["val"]
    assert hashes["train"] <= pretraining  # the comparison can find a plane
    # the same through data_prep: the cache pretraining reads holds no test plane
    cache = set(prepped(cohort.archive, tmp_path / "archive"))
    folder = tmp_path / "test_series"
    folder.mkdir()
    for p in files["test"]:
        shutil.copy(p, folder / p.name)
    test = prepped([folder], tmp_path / "test_prep")
    assert len(set(test)) == len(test) == 4 * SMALL.planes and not cache & set(test)
    assert len(cache) == 10 * SMALL.planes
    # fine-tuning's CSV holds training and validation patients only
    with open(transfer_cls.write_csv(tmp_path / "cases.csv", cohort), newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(Path(r["image"]) for r in rows) == sorted(files["train"] + files["val"])
    assert [r["split"] for r in rows] == ["train"] * 4 + ["val"] * 4
    record = json.loads((tmp_path / "work" / "patients.json").read_text())
    assert sum(r["label"] for r in record if r["role"] == "test") == 2


def test_without_final_test_no_test_patient_is_scored_and_nothing_is_logged(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, anatomy: transfer_cls.Anatomy
) -> None:
    calls = []

    def finetune(work, export, init, seed, recipe, cases_csv, test):  # type: ignore[no-untyped-def]
        calls.append(test)
        base = {"medmae": 0.8, "random": 0.6, "random-sincos": 0.7}[init] + 0.01 * seed
        return {"val": base, **({"test": base - 0.05} if test is not None else {})}

    monkeypatch.setattr(transfer_cls, "mni_anatomy", lambda: anatomy)
    monkeypatch.setattr(transfer_cls, "Task", lambda: SMALL)
    monkeypatch.setattr(transfer_cls, "pretrain", lambda work, recipe, archive: tmp_path / "encoder")
    monkeypatch.setattr(transfer_cls, "finetune", finetune)
    log, out = tmp_path / "looks.jsonl", tmp_path / "r.json"
    common = ["--seeds", "0", "1", "--work", str(tmp_path / "w"), "--json", str(out), "--test-log", str(log)]
    common += ["--labelled", "4", "--unlabelled", "2"]
    assert transfer_cls.main(common) == 0
    report = json.loads(out.read_text())
    assert calls == [None] * 6 and not log.exists() and "test" not in report
    assert report["val"]["ratio_vs_random-sincos"] == pytest.approx(0.805 / 0.705)
    assert report["val"]["every_seed_above_random-sincos"] is True
    calls.clear()
    assert transfer_cls.main([*common, "--final-test"]) == 0
    report = json.loads(out.read_text())
    assert all(test is not None and len(test) == SMALL.test_patients for test in calls)
    (look,) = [json.loads(line) for line in log.read_text().splitlines()]
    assert look["benchmark"] == "transfer_cls_mni_focal_lesion" and look["summary"] == report["test"]
    assert look["per_seed"] == report["per_seed"] and look["recipe"]["task"]["contrast"] == list(SMALL.contrast)


@pytest.mark.slow
def test_transfer_cls_quick_mode_runs_the_whole_path(tmp_path: Path) -> None:
    if importlib.util.find_spec("nilearn") is None:
        pytest.fail('the transfer benchmarks need nilearn\'s MNI152 files: pip install -e ".[transfer]"')
    out, log, work = tmp_path / "result.json", tmp_path / "looks.jsonl", tmp_path / "work"
    args = ["--quick", "--seeds", "0", "--work", str(work), "--json", str(out), "--final-test", "--test-log", str(log)]
    assert transfer_cls.main(args) == 0
    report = json.loads(out.read_text())
    quick = transfer_cls.QUICK_TASK
    assert report["val_patients"] == quick["val_patients"] and report["test_patients"] == quick["test_patients"]
    assert report["labelled_patients"] == transfer_cls.QUICK["labelled"]
    for init in ("medmae", "random", "random-sincos"):
        (only,) = report["per_seed"][init]
        assert 0.0 <= only["test"] <= 1.0 and 0.0 <= only["val"] <= 1.0
    assert {"ratio_vs_random", "ratio_vs_random-sincos", "margin_vs_random"} <= set(report["test"])
    (look,) = [json.loads(line) for line in log.read_text().splitlines()]
    assert look["benchmark"] == transfer_cls.BENCHMARK
    assert look["per_seed"] == report["per_seed"] and look["summary"] == report["test"]
    # the pretraining cache never held a test (or validation) plane
    test = sorted((work / "series" / "test").glob("*.nii.gz"))
    assert len(test) == report["test_patients"]
    prep_archive([work / "series" / "test"], tmp_path / "tcache", workers=1, salt_file=tmp_path / "s",
                 val_fraction=0.0, progress=False)  # fmt: skip
    assert not set(cache_plane_hashes(work / "cache")) & set(cache_plane_hashes(tmp_path / "tcache"))
