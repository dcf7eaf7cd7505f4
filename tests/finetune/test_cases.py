"""One case table for segmentation and classification: the same reader, checks and seed-free split.

Each test failed before the two CSV readers were merged (issue 16, item 3): the segmentation reader let
a patient sit on both sides, choked on Excel's byte-order mark, had no modality column, and both splits
moved with the fine-tuning seed.
"""

from __future__ import annotations

import csv
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medmae.finetune.cases import Case, patient_split
from medmae.finetune.cls_data import ClassificationDataModule, read_label_csv
from medmae.finetune.seg_data import SegmentationDataModule
from medmae.finetune.volumes import VolumeError


def write_csv(path: Path, rows: list[dict[str, str]], encoding: str = "utf-8") -> Path:
    with open(path, "w", newline="", encoding=encoding) as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


@pytest.fixture
def files(tmp_path: Path) -> Path:
    """Twenty tiny NIfTI images with labels (contents never read by these tests)."""
    for i in range(20):
        nib.save(nib.Nifti1Image(np.zeros((4, 4, 2), np.int16), np.eye(4)), str(tmp_path / f"im{i}.nii.gz"))
        nib.save(nib.Nifti1Image(np.zeros((4, 4, 2), np.uint8), np.eye(4)), str(tmp_path / f"lab{i}.nii.gz"))
    return tmp_path


def seg_rows(n: int = 20) -> list[dict[str, str]]:
    return [{"image": f"im{i}.nii.gz", "label": f"lab{i}.nii.gz", "patient": f"P{i // 2}"} for i in range(n)]


def seg_cases(csv_path: Path, **kw: object) -> list[Case]:
    return SegmentationDataModule("random:none", 2, csv=str(csv_path), **kw).cases()  # type: ignore[arg-type]


def test_segmentation_refuses_a_patient_on_both_sides(files: Path) -> None:
    rows = seg_rows(4)
    rows[0]["split"], rows[1]["split"], rows[2]["split"], rows[3]["split"] = "train", "val", "train", "train"
    with pytest.raises(VolumeError, match=r"row 3: patient is in split 'val' but row 2 puts it in 'train'"):
        seg_cases(write_csv(files / "cases.csv", rows))


def test_excel_byte_order_mark_is_read_by_both_tasks(files: Path) -> None:
    rows = seg_rows(4)
    seg = seg_cases(write_csv(files / "seg.csv", rows, encoding="utf-8-sig"))
    assert [Path(c.image).name for c in seg] == [f"im{i}.nii.gz" for i in range(4)]
    cls_rows = [{"image": r["image"], "label": "1", "patient": r["patient"]} for r in rows]
    cls = read_label_csv(write_csv(files / "cls.csv", cls_rows, encoding="utf-8-sig"), "binary", ["0", "1"])
    assert [c.label for c in cls] == [(1.0,)] * 4


def test_modality_column_is_read_for_segmentation_and_checked(files: Path) -> None:
    rows = seg_rows(3)
    for r, m in zip(rows, ("CT", "mr", ""), strict=True):
        r["modality"] = m
    cases = seg_cases(write_csv(files / "cases.csv", rows))
    assert [c.modality for c in cases] == ["CT", "MR", None]
    rows[2]["modality"] = "not a code"
    with pytest.raises(VolumeError, match=r"row 4: column 'modality' must be a DICOM modality code"):
        seg_cases(write_csv(files / "bad.csv", rows))


def test_split_depends_on_split_seed_not_on_the_fine_tuning_seed(files: Path) -> None:
    path = write_csv(files / "cases.csv", seg_rows())

    def sides(**kw: object) -> list[str]:
        return [c.split for c in seg_cases(path, val_fraction=0.3, **kw)]

    assert sides(seed=0) == sides(seed=1) == sides(seed=12345)
    assert {"train", "val"} == set(sides(seed=0))
    assert any(sides(split_seed=k) != sides() for k in range(1, 10))  # the split key does move it
    cls_rows = [{"image": r["image"], "label": "0", "patient": r["patient"]} for r in seg_rows()]
    cls_path = write_csv(files / "cls.csv", cls_rows)

    def cls_sides(seed: int) -> list[str]:
        dm = ClassificationDataModule("random:none", str(cls_path), val_fraction=0.3, seed=seed)
        return [c.split for c in dm.rows()]

    assert cls_sides(0) == cls_sides(7) == sides()  # one keyed hash for both tasks
    assert sides() == [patient_split(f"P{i // 2}", 0.3, 0) for i in range(20)]


def test_folder_convention_uses_the_same_split(tmp_path: Path) -> None:
    for sub in ("images", "labels"):
        (tmp_path / sub).mkdir()
        for i in range(10):
            nib.save(nib.Nifti1Image(np.zeros((2, 2, 2), np.uint8), np.eye(4)), str(tmp_path / sub / f"c{i}.nii.gz"))
    a = SegmentationDataModule("random:none", 2, folder=str(tmp_path), val_fraction=0.5, seed=0).cases()
    b = SegmentationDataModule("random:none", 2, folder=str(tmp_path), val_fraction=0.5, seed=3).cases()
    assert [c.split for c in a] == [c.split for c in b] == [patient_split(f"c{i}", 0.5) for i in range(10)]
