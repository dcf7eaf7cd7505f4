"""benchmarks/transfer3d.py: the box split (default suite, on a synthetic left-right symmetric volume, no
nilearn), the protocol wiring with stand-in stages, and the whole path in its reduced mode (slow)."""

from __future__ import annotations

import csv
import dataclasses
import importlib.util
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from data_prep import prep_archive
from medmae.data.cache import load_manifest, open_series_array

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import transfer3d  # noqa: E402

sys.path.pop(0)

#: boxes of 12 voxels, 2 apart: 3 x 4 x 3 boxes on the synthetic volume below
SMALL = dataclasses.replace(transfer3d.Recipe(), box=12, gap=2, min_brain=0.1, labelled=2)


def symmetric_volume(shape: tuple[int, int, int] = (41, 60, 48)) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(t1, label, affine)``: noise that is nowhere zero (every voxel's neighbourhood is unique) in a
    volume that is exactly left-right symmetric along x, as the MNI 2009a *sym* template is; labels 1/2
    inside an ellipsoid "brain", mirrored the same way."""
    rng = np.random.default_rng(0)
    t1 = rng.integers(1, 256, shape).astype(np.int16)
    label = rng.integers(1, 3, shape).astype(np.uint8)
    grid = np.mgrid[: shape[0], : shape[1], : shape[2]].astype(float)
    centre = [(n - 1) / 2 for n in shape]
    inside = sum(((g - c) / (0.42 * n)) ** 2 for g, c, n in zip(grid, centre, shape, strict=True)) <= 1
    label[~inside] = 0
    half = (shape[0] + 1) // 2
    t1[half:] = t1[: shape[0] - half][::-1]
    label[half:] = label[: shape[0] - half][::-1]
    assert np.array_equal(t1, t1[::-1]) and np.array_equal(label, label[::-1])
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    affine[:3, 3] = (-20.0, -30.0, -24.0)
    return t1, label, affine


def cache_arrays(cache: Path) -> list[np.ndarray]:
    """Every series array of a cache as pretraining reads it (``(Z, Y, X)``)."""
    return [np.asarray(open_series_array(cache, row)) for row in load_manifest(cache).rows]


def test_the_box_plan_is_disjoint_column_wise_and_seed_free() -> None:
    _, label, _ = symmetric_volume()
    boxes = transfer3d.plan_boxes(label, SMALL)
    assert boxes == transfer3d.plan_boxes(label, SMALL)  # a pure function: no seed anywhere
    roles = {b.role for b in boxes}
    assert roles == {"train", "pool", "val", "test"}
    assert sum(b.role == "train" for b in boxes) == SMALL.labelled
    edge = transfer3d.box_edge(SMALL)
    for i, a in enumerate(boxes):
        for b in boxes[i + 1 :]:
            # disjoint with at least `gap` voxels between them along some axis
            assert any(abs(p - q) >= edge + SMALL.gap for p, q in zip(a.start, b.start, strict=True))
    # every box of a (y, z) column shares the role (labelled boxes come from pool columns)
    by_column: dict[tuple[int, int], set[str]] = {}
    for b in boxes:
        by_column.setdefault(b.column, set()).add("pool" if b.role == "train" else b.role)
    assert all(len(r) == 1 for r in by_column.values())
    assert all(b.brain >= SMALL.min_brain for b in boxes)


def test_test_boxes_share_no_voxel_with_pretraining_by_hash(tmp_path: Path) -> None:
    t1, label, affine = symmetric_volume()
    split = transfer3d.write_boxes(tmp_path / "work", t1, label, affine, SMALL)
    archive = sorted(split.archive.glob("*.nii.gz"))
    assert len(archive) == sum(b.role not in ("test", "val") for b in split.boxes)
    images = {role: [img for img, _ in split.cases[role]] for role in transfer3d.ROLES}
    assert [len(images[r]) for r in transfer3d.ROLES] == [
        sum(b.role == r for b in split.boxes) for r in transfer3d.ROLES
    ]
    pretraining = transfer3d.block_hashes(transfer3d.nifti_arrays(archive))
    test = transfer3d.block_hashes(transfer3d.nifti_arrays(images["test"]))
    assert test and not test & pretraining  # no 8-cube of a test box, nor its mirror image, is pretrained on
    val = transfer3d.block_hashes(transfer3d.nifti_arrays(images["val"]))
    assert val and not val & pretraining  # nor of a validation box: validation stands in for test
    # the comparison can find shared voxels: labelled boxes are in the archive
    assert transfer3d.block_hashes(transfer3d.nifti_arrays(images["train"])) <= pretraining
    # --pretrain-sees-val true: the first run's archive, validation boxes in it
    sees_val = dataclasses.replace(SMALL, pretrain_sees_val=True)
    old = transfer3d.write_boxes(tmp_path / "old", t1, label, affine, sees_val)
    assert val <= transfer3d.block_hashes(transfer3d.nifti_arrays(sorted(old.archive.glob("*.nii.gz"))))
    # ... and mirrored ones: the template is symmetric, so a box's mirror twin holds its voxels
    left = [b for b in split.boxes if b.role == "test" and b.start[0] == min(x.start[0] for x in split.boxes)]
    right = [b for b in split.boxes if b.role == "test" and b.column == left[0].column and b is not left[0]]
    path = {b.index: p for b, p in zip((b for b in split.boxes if b.role == "test"), images["test"], strict=True)}
    plain = transfer3d.block_hashes(transfer3d.nifti_arrays([path[left[0].index]]), mirror_axis=None)
    assert plain & transfer3d.block_hashes(transfer3d.nifti_arrays([path[right[-1].index]]))
    # the same after data_prep: the cache pretraining reads holds no test voxel
    salt = tmp_path / "salt"
    salt.write_text(transfer3d.BENCHMARK_SALT + "\n")
    prep_archive([split.archive], tmp_path / "cache", workers=1, salt_file=salt, val_fraction=0.0, progress=False)
    folder = tmp_path / "test_boxes"
    folder.mkdir()
    for p in images["test"]:
        shutil.copy(p, folder / p.name)
    prep_archive([folder], tmp_path / "tcache", workers=1, salt_file=salt, val_fraction=0.0, progress=False)
    cached = transfer3d.block_hashes(cache_arrays(tmp_path / "cache"), mirror_axis=2)
    cached_test = transfer3d.block_hashes(cache_arrays(tmp_path / "tcache"), mirror_axis=2)
    assert len(load_manifest(tmp_path / "cache").rows) == len(archive)
    assert cached_test and not cached & cached_test
    # fine-tuning's CSV holds the labelled and validation boxes only
    with open(transfer3d.write_csv(tmp_path / "cases.csv", split.cases), newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(Path(r["image"]) for r in rows) == sorted(images["train"] + images["val"])


def test_without_final_test_no_test_box_is_scored_and_nothing_is_logged(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    calls: list[object] = []

    def finetune(work, export, init, seed, recipe, cases_csv, test):  # type: ignore[no-untyped-def]
        calls.append(test)
        base = {"medmae": 0.8, "random": 0.6, "random-sincos": 0.7}[init] + 0.01 * seed
        return {"val": base, **({"test": base - 0.05} if test is not None else {})}

    monkeypatch.setattr(transfer3d, "mni_volumes", symmetric_volume)
    monkeypatch.setattr(transfer3d, "pretrain3d", lambda work, recipe, archive: tmp_path / "encoder")
    monkeypatch.setattr(transfer3d, "finetune", finetune)
    log, out = tmp_path / "looks.jsonl", tmp_path / "r.json"
    common = ["--work", str(tmp_path / "w"), "--json", str(out), "--test-log", str(log)]
    common += ["--box", "12", "--gap", "2", "--labelled", "2"]
    assert transfer3d.main(common) == 0
    report = json.loads(out.read_text())
    assert report["seeds"] == [0, 1, 2]  # the default: 3 seeds
    assert calls == [None] * 9 and not log.exists() and "test" not in report
    assert "not scored" in capsys.readouterr().out
    assert report["val"]["ratio_vs_random-sincos"] == pytest.approx(0.81 / 0.71)
    assert report["benchmark"] == "transfer_seg3d_mni_tissue" and report["machine"]
    assert report["labelled_boxes"] == 2
    assert len(report["boxes"]) == report["pretraining_boxes"] + report["test_boxes"] + report["val_boxes"]
    calls.clear()
    assert transfer3d.main([*common, "--seeds", "0", "--final-test"]) == 0
    report = json.loads(out.read_text())
    assert len(calls) == 3 and all(isinstance(t, list) and len(t) == report["test_boxes"] for t in calls)
    (look,) = [json.loads(line) for line in log.read_text().splitlines()]
    assert look["benchmark"] == transfer3d.BENCHMARK and look["summary"] == report["test"]
    assert look["per_seed"] == report["per_seed"] and look["recipe"]["box"] == 12


@pytest.mark.slow
def test_transfer3d_quick_mode_runs_the_whole_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    if importlib.util.find_spec("nilearn") is None:
        pytest.fail('the transfer benchmarks need nilearn\'s MNI152 files: pip install -e ".[transfer]"')
    out, log, work = tmp_path / "result.json", tmp_path / "looks.jsonl", tmp_path / "work"
    args = ["--quick", "--seeds", "0", "--work", str(work), "--json", str(out), "--test-log", str(log)]
    assert transfer3d.main(args) == 0
    report = json.loads(out.read_text())
    printed = capsys.readouterr().out
    # validation only: test is neither scored nor logged without --final-test
    assert "test" not in report and not log.exists() and "not scored" in printed
    assert all(set(r) == {"val"} for rows in report["per_seed"].values() for r in rows)
    assert report["benchmark"] == transfer3d.BENCHMARK and "threads" in report["machine"]
    assert report["labelled_boxes"] == transfer3d.QUICK["labelled"] and report["val_boxes"] > 0
    assert report["recipe"]["pretrain_steps"] == transfer3d.QUICK["pretrain_steps"]
    for init in ("medmae", "random", "random-sincos"):
        (only,) = report["per_seed"][init]
        assert 0.0 <= only["val"] <= 1.0
        assert f"seed 0 {init}" in printed
    assert {"ratio_vs_random", "ratio_vs_random-sincos", "margin_vs_random", "margin_vs_random-sincos"} <= set(
        report["val"]
    )
    card = json.loads((work / "encoder3d" / "encoder.json").read_text())
    assert card["encoder"]["arch"] == "medmae_vit3d"
    # the pretraining cache of the real template holds no test voxel, mirrored or not
    test = sorted((work / "labelled").glob("test_??.nii.gz"))
    assert len(test) == report["test_boxes"]
    folder = tmp_path / "test_boxes"
    folder.mkdir()
    for p in test:
        shutil.copy(p, folder / p.name)
    prep_archive([folder], tmp_path / "tcache", workers=1, salt_file=tmp_path / "s", val_fraction=0.0, progress=False)
    cached = transfer3d.block_hashes(cache_arrays(work / "cache"), mirror_axis=2)
    cached_test = transfer3d.block_hashes(cache_arrays(tmp_path / "tcache"), mirror_axis=2)
    assert cached_test and not cached & cached_test
