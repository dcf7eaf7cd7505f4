"""benchmarks/extra_scans.py: other people's scans for the transfer benchmark's pretraining archive."""

from __future__ import annotations

import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import extra_scans  # noqa: E402

sys.path.pop(0)


def test_lps_directions_become_a_ras_affine() -> None:
    # pyradiomics' brain1 in LPS: x steps to the patient's left, y anterior (a negative P step), 6.5 mm slices
    directions = np.array([[0.78125, 0, 0], [0, -0.78125, 0], [0, 0, 6.5]])
    affine = extra_scans.lps_to_ras_affine(directions, np.array([-99.6, 99.6, -78.0]))
    assert nib.aff2axcodes(affine) == ("L", "A", "S")  # the array still steps left and anterior; now said in RAS
    assert affine[:3, 3] == pytest.approx([99.6, -99.6, -78.0])
    assert np.abs(np.diag(affine)[:3]) == pytest.approx([0.78125, 0.78125, 6.5])


def test_other_axes_stack_coronal_and_sagittal_planes_along_the_third_axis() -> None:
    data = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)  # (x, y, z), RAS
    img = nib.Nifti1Image(data, np.diag([1.0, 1.0, 1.2, 1.0]))
    (coronal_name, coronal), (sagittal_name, sagittal) = extra_scans.other_axes("scan", img)
    assert (coronal_name, sagittal_name) == ("scan_coronal", "scan_sagittal")
    cor, sag = np.asarray(coronal.dataobj), np.asarray(sagittal.dataobj)
    assert [np.array_equal(cor[:, :, j], data[:, j, :]) for j in range(5)] == [True] * 5  # plane j = y-slice j
    assert [np.array_equal(sag[:, :, i], data[i, :, :]) for i in range(4)] == [True] * 4  # plane i = x-slice i
    assert coronal.header.get_zooms() == pytest.approx((1.0, 1.2, 1.0))


def test_thick_slices_give_no_other_axes() -> None:
    img = nib.Nifti1Image(np.zeros((8, 8, 3), np.int16), np.diag([0.78, 0.78, 6.5, 1.0]))
    assert extra_scans.other_axes("thick", img) == []


def test_a_missing_source_says_how_to_get_it(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="apt-get install mricron-data"):
        extra_scans.write_extra_scans(tmp_path / "out", None, use_pydeface=False, colin27=tmp_path)
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_every_source_and_its_other_axes_land_in_one_folder(tmp_path: Path) -> None:
    templates = tmp_path / "templates"
    templates.mkdir()
    brain = np.zeros((6, 7, 5), np.uint8)
    brain[1:5, 2:6, 1:4] = 200
    nib.save(nib.Nifti1Image(brain, np.diag([1.0, 1.0, 1.0, 1.0])), str(templates / "ch2bet.nii.gz"))
    written = extra_scans.write_extra_scans(tmp_path / "out", None, use_pydeface=False, axes="all", colin27=templates)
    assert [p.name for p in written] == [
        "colin27_brain.nii.gz", "colin27_brain_coronal.nii.gz", "colin27_brain_sagittal.nii.gz"
    ]  # fmt: skip
    assert [nib.load(str(p)).shape for p in written] == [(6, 7, 5), (6, 5, 7), (7, 5, 6)]
    assert all(np.asarray(nib.load(str(p)).dataobj).sum() == brain.sum() for p in written)  # same voxels, restacked
