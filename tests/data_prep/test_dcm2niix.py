"""Voxel values and affine equal dcm2niix's (the reference for series geometry) on valid series.

dcm2niix writes RAS+ NIfTI with its own row flip; both outputs are brought to our canonical LPS
layout *independently of data_prep* (nibabel's ``as_closest_canonical``, then x/y flips) and compared.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from tests.data_prep.factory import PYDICOM_FILES, set_pixels, slice_pattern, volume_series

DCM2NIIX = shutil.which("dcm2niix")
pytestmark = pytest.mark.skipif(DCM2NIIX is None, reason="dcm2niix is not installed (Debian package dcm2niix)")

_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def dcm2niix_canonical(folder: Path, out: Path) -> tuple[np.ndarray, np.ndarray]:
    """Run dcm2niix on one series folder; return its (Z, Y, X) LPS-canonical array and affine."""
    out.mkdir()
    subprocess.run([DCM2NIIX, "-o", str(out), "-f", "ref", "-z", "n", "-b", "n", str(folder)],
                   check=True, capture_output=True)
    (nii,) = out.glob("ref*.nii")
    img = nib.load(nii)
    if img.ndim == 2:
        img = nib.Nifti1Image(np.asarray(img.dataobj)[:, :, None], img.affine, img.header)
    ras = nib.as_closest_canonical(img)
    data = np.asarray(ras.get_fdata())
    nx, ny = data.shape[:2]
    flip_xy = np.array([[-1, 0, 0, nx - 1], [0, -1, 0, ny - 1], [0, 0, 1, 0], [0, 0, 0, 1.0]])
    return data[::-1, ::-1, :].transpose(2, 1, 0), _LPS @ ras.affine @ flip_xy


def _rotation(axis: np.ndarray, degrees: float) -> np.ndarray:
    axis = axis / np.linalg.norm(axis)
    a = np.deg2rad(degrees)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(a) * k + (1 - np.cos(a)) * k @ k


_OBLIQUE = _rotation(np.array([1.0, 0.3, 0.2]), 25)

CASES = {
    "axial_ct": dict(modality="CT", orientation=(1, 0, 0, 0, 1, 0)),
    "axial_rotated_180": dict(modality="CT", orientation=(-1, 0, 0, 0, -1, 0)),
    "sagittal_mr": dict(modality="MR", intercept=0, orientation=(0, 1, 0, 0, 0, -1)),
    "coronal_mr": dict(modality="MR", intercept=0, orientation=(1, 0, 0, 0, 0, -1)),
    "oblique_mr": dict(modality="MR", intercept=0, orientation=tuple(np.r_[_OBLIQUE[:, 0], _OBLIQUE[:, 1]])),
    "rle_ct": dict(modality="CT", rle=(0, 2, 3)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_dcm2niix(prep, tmp_path: Path, case: str) -> None:
    series = volume_series(tmp_path / "in" / "s", n=6, rows=20, cols=28, slice_spacing=2.5, **CASES[case])
    ref, ref_affine = dcm2niix_canonical(tmp_path / "in" / "s", tmp_path / "d2n")
    run = prep(tmp_path / "in")
    got = run.array(series.paths[0])
    assert got.shape == ref.shape
    np.testing.assert_array_equal(got.astype(np.float64), ref)
    np.testing.assert_allclose(np.array(run.row(series.paths[0]).affine), ref_affine, atol=1e-4)


@pytest.mark.parametrize(("folder", "file"), [("dicomdirtests/98892001/CT5N", "2062"), (None, "MR_small.dcm")])
def test_real_series_match_dcm2niix(prep, tmp_path: Path, folder: str | None, file: str) -> None:
    src = tmp_path / "in"
    if folder is None:
        src.mkdir()
        shutil.copy(PYDICOM_FILES / file, src / file)
    else:
        shutil.copytree(PYDICOM_FILES / folder, src)
    ref, ref_affine = dcm2niix_canonical(src, tmp_path / "d2n")
    run = prep(src, allow_secondary=True)  # MR_small is ImageType DERIVED\SECONDARY
    np.testing.assert_array_equal(run.array(src / file).astype(np.float64), ref)
    np.testing.assert_allclose(np.array(run.row(src / file).affine), ref_affine, atol=1e-3)


@pytest.mark.parametrize("stored", ["int16", "uint16"])
def test_ct_as_dicom_and_as_dcm2niix_nifti_give_the_same_record(prep, tmp_path: Path, stored: str) -> None:
    """Issue 9: the same CT series, as DICOM and as dcm2niix's NIfTI + JSON sidecar, is one cache record:
    modality CT, intensity HU, the same values, statistics and geometry (the sidecar's Modality is read)."""
    rows, cols, seed = 20, 28, 5

    def storage(ds, k: int) -> None:  # RescaleIntercept -1024 over int16 or uint16 stored pixels
        set_pixels(ds, slice_pattern(k, rows, cols, seed).astype(stored))

    series = volume_series(tmp_path / "dicom" / "ct", n=6, rows=rows, cols=cols, slice_spacing=2.5,
                           intercept=-1024.0, seed=seed, extra=storage)
    nifti_dir = tmp_path / "nifti"
    nifti_dir.mkdir()
    subprocess.run([DCM2NIIX, "-o", str(nifti_dir), "-f", "ct", "-z", "y", "-b", "y", "-ba", "y",
                    str(tmp_path / "dicom" / "ct")], check=True, capture_output=True)
    nii, side = nifti_dir / "ct.nii.gz", nifti_dir / "ct.json"
    assert nii.is_file() and side.is_file()

    dicom, nifti = prep(tmp_path / "dicom"), prep(nifti_dir)
    a, b = dicom.row(series.paths[0]), nifti.row(nii)
    assert (a.modality, a.intensity, a.modality_source) == ("CT", "HU", "dicom")
    assert (b.modality, b.intensity, b.modality_source) == ("CT", "HU", "sidecar")
    assert (a.shape, a.dtype, a.kind) == (b.shape, b.dtype, b.kind) == ((6, rows, cols), "int16", "volume")
    assert b.stats == pytest.approx(a.stats, rel=1e-12, abs=1e-9)
    assert b.spacing == pytest.approx(a.spacing, abs=1e-4)
    np.testing.assert_allclose(np.array(b.affine), np.array(a.affine), atol=1e-3)
    np.testing.assert_array_equal(nifti.array(nii), dicom.array(series.paths[0]))
    assert a.stats["min"] < -900  # really HU: air near -1024
    assert nifti.row(side) == b and nifti.report["files_in_built_series"] == 2  # the sidecar is accounted
    # dcm2niix's anonymised sidecar still names the institution and station: none of it is copied
    for f in nifti.out.rglob("*"):
        if f.is_file():
            assert b"General Hospital" not in f.read_bytes() and b"CT01" not in f.read_bytes(), f.name
