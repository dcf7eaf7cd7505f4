"""The real files shipped with pydicom and nibabel: the right series, or the right reason, no crash."""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel
import numpy as np
import pydicom
import pytest

from data_prep import Reason
from tests.data_prep.conftest import PrepRun
from tests.data_prep.factory import PYDICOM_FILES

DICOMDIR_TESTS = PYDICOM_FILES / "dicomdirtests"
NIBABEL_DATA = Path(nibabel.__file__).parent / "tests" / "data"


def _hu(path: Path) -> np.ndarray:
    ds = pydicom.dcmread(path)
    return ds.pixel_array * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0))


@pytest.fixture(scope="module")
def dicomdir_run(tmp_path_factory: pytest.TempPathFactory) -> PrepRun:
    from tests.data_prep.conftest import run_prep

    return run_prep(DICOMDIR_TESTS, tmp_path_factory.mktemp("dd") / "cache")


def test_dicomdir_tree_accounting(dicomdir_run: PrepRun) -> None:
    c = dicomdir_run.report["counts"]
    assert c["dicomdir"] == 8  # DICOMDIR and its variants, by name or by SOP class
    assert c["no_pixel_data"] == 50  # TINY_ALPHA: CT headers without pixels
    assert c["localizer"] == 2
    assert c["missing_slices"] == 4  # CT2: one slice 200 mm away from three 1.25 mm apart
    assert c["not_recognised"] == 2  # README.txt, TINY_ALPHA/README
    assert c["secondary_capture"] == 7  # MR700: radial MIPs, ImageType DERIVED\SECONDARY, no BurnedInAnnotation
    r = dicomdir_run.report
    assert r["files_in_built_series"] + r["files_rejected"] == r["files_seen"] == 91


def test_dicomdir_tree_ct_sorted_by_position_not_instance_number(dicomdir_run: PrepRun) -> None:
    folder = DICOMDIR_TESTS / "98892001" / "CT5N"
    row = dicomdir_run.row(folder / "2062")
    assert (row.modality, row.kind, row.shape, row.dtype) == ("CT", "volume", (5, 16, 16), "int16")
    assert row.spacing == pytest.approx((2.5, 0.488281, 0.488281))
    arr = dicomdir_run.array(folder / "2062")
    # InstanceNumber rises 6..10 while z falls: ascending z is file order reversed
    for z, name in enumerate(["3353", "3023", "2693", "2392", "2062"]):
        np.testing.assert_array_equal(arr[z], _hu(folder / name))


def test_dicomdir_tree_cr_are_images_and_mr_slices_volumes(dicomdir_run: PrepRun) -> None:
    for name in ("CR1/6154", "CR2/6247", "CR3/6278"):
        row = dicomdir_run.row(DICOMDIR_TESTS / "77654033" / name)
        assert (row.kind, row.modality, row.shape) == ("image", "CR", (1, 16, 16))
    mr = [r for r in dicomdir_run.manifest.rows if r.modality == "MR"]
    assert len(mr) == 3 + 7  # each MR file here is its own plane (tri-plane surveys); the 7 radial MIPs
    assert all(sorted(r.shape) == [1, 16, 16] for r in mr)  # (DERIVED\SECONDARY) are refused by default


def test_dicomdir_tree_radial_mips_are_kept_with_allow_secondary(tmp_path: Path, prep) -> None:
    run = prep(DICOMDIR_TESTS / "98892003" / "MR700", allow_secondary=True)
    assert run.report["files_in_built_series"] == 7 and "secondary_capture" not in run.report["counts"]
    assert {r.intensity for r in run.manifest.rows} == {"raw"}


@pytest.mark.parametrize(
    "name",
    [
        "MR_small_RLE.dcm",  # RLE Lossless
        "MR_small_jp2klossless.dcm",  # JPEG 2000 lossless
        "MR_small_jpeg_ls_lossless.dcm",  # JPEG-LS lossless
        "MR_small_bigendian.dcm",
        "MR_small_implicit.dcm",
        "MR_small_padded.dcm",
    ],
)
def test_compressed_and_encoded_variants_equal_the_plain_file(prep, tmp_path: Path, name: str) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    plain = Path(shutil.copy(PYDICOM_FILES / "MR_small.dcm", tmp_path / "a" / "x"))
    variant = Path(shutil.copy(PYDICOM_FILES / name, tmp_path / "b" / "x"))
    # MR_small is ImageType DERIVED\SECONDARY: refused by default, kept on request (decoding is tested here)
    ref, got = prep(tmp_path / "a", allow_secondary=True), prep(tmp_path / "b", allow_secondary=True)
    np.testing.assert_array_equal(got.array(variant), ref.array(plain))
    assert got.row(variant).affine == ref.row(plain).affine


def test_jpeg_lossless_process14_decoder_is_installed() -> None:
    """The one JPEG Lossless (P14) file at hand is RGB (prep rejects colour), so check the decoder
    prep relies on (pylibjpeg-libjpeg) against the same picture stored RLE."""
    jpeg = pydicom.dcmread(PYDICOM_FILES / "SC_rgb_jpeg_gdcm.dcm")
    assert jpeg.file_meta.TransferSyntaxUID == pydicom.uid.JPEGLosslessSV1
    np.testing.assert_array_equal(jpeg.pixel_array, pydicom.dcmread(PYDICOM_FILES / "SC_rgb_rle.dcm").pixel_array)


@pytest.mark.parametrize(
    ("name", "shape", "reason"),
    [
        ("JPEG2000.dcm", (1, 1024, 256), None),
        ("JPGExtended.dcm", (1, 1024, 256), None),  # 12-bit JPEG extended
        ("693_J2KI.dcm", (1, 512, 512), None),
        ("JPEGLSNearLossless_16.dcm", (1, 50, 10), None),
        ("CT_small.dcm", (1, 128, 128), None),
        ("image_dfl.dcm", (1, 512, 512), None),  # deflated explicit VR little endian
        ("MR_truncated.dcm", None, Reason.PIXEL_DECODE_FAILED),
        # its SIZ marker says 3722445056 x 1024 (Pillow refuses it as a decompression bomb): refused unread
        ("JPEG2000-embedded-sequence-delimiter.dcm", None, Reason.SIZE_MISMATCH),
        ("rtdose.dcm", None, Reason.NON_IMAGE_SOP),
        ("rtplan.dcm", None, Reason.NON_IMAGE_SOP),
        ("rtstruct.dcm", None, Reason.NON_IMAGE_SOP),
        ("test-SR.dcm", None, Reason.NON_IMAGE_SOP),
        ("waveform_ecg.dcm", None, Reason.NON_IMAGE_SOP),
        ("liver_1frame.dcm", None, Reason.NON_IMAGE_SOP),  # DICOM SEG
        ("ExplVR_LitEndNoMeta.dcm", None, Reason.NON_IMAGE_SOP),  # RT Ion Plan without meta/preamble
        ("examples_ybr_color.dcm", None, Reason.COLOR_IMAGE),
        ("examples_palette.dcm", None, Reason.COLOR_IMAGE),
        ("README.txt", None, Reason.NOT_RECOGNISED),
        ("zipMR.gz", None, Reason.NOT_RECOGNISED),
    ],
)
def test_pydicom_test_files(prep, tmp_path: Path, name: str, shape, reason) -> None:
    """Decoding and file-level reasons; several of these are secondary captures (see the next test),
    so they are prepped with ``allow_secondary`` to reach the decoder."""
    (tmp_path / "in").mkdir()
    path = Path(shutil.copy(PYDICOM_FILES / name, tmp_path / "in" / name))
    run = prep(tmp_path / "in", allow_secondary=True)
    if reason is None:
        assert run.row(path).shape == shape
        assert np.isfinite(run.array(path)).all()
    else:
        assert run.reason(path) == reason.value


#: pydicom samples that are Secondary Capture SOP class or ImageType DERIVED\SECONDARY (grayscale; the
#: colour ones stay color_image), none with BurnedInAnnotation: refused by default.
SECONDARY_SAMPLES = (
    "JPEG2000.dcm", "JPGExtended.dcm", "JPEG-lossy.dcm", "JPEGLSNearLossless_08.dcm", "JPEGLSNearLossless_16.dcm",
    "image_dfl.dcm", "MR_small.dcm", "MR_small_RLE.dcm", "MR_truncated.dcm", "examples_overlay.dcm",
)


def test_secondary_captures_and_derived_secondary_samples_are_refused_by_default(prep, tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    paths = [Path(shutil.copy(PYDICOM_FILES / name, tmp_path / "in" / name)) for name in SECONDARY_SAMPLES]
    rgb = Path(shutil.copy(PYDICOM_FILES / "SC_rgb_rle.dcm", tmp_path / "in" / "rgb"))
    run = prep(tmp_path / "in")
    assert [run.reason(p) for p in paths] == [Reason.SECONDARY_CAPTURE.value] * len(paths)
    assert run.reason(rgb) == Reason.COLOR_IMAGE.value  # colour is checked first, as before


def test_whole_pydicom_test_folder_never_crashes(prep) -> None:
    run = prep(PYDICOM_FILES, workers=2)
    r = run.report
    assert r["files_in_built_series"] + r["files_rejected"] == r["files_seen"] > 90
    assert "build_failed" not in r["counts"] and "dicom_unreadable" not in r["counts"]


@pytest.mark.parametrize(
    ("name", "shape", "reason"),
    [
        ("anatomical.nii", (25, 41, 33), None),
        ("example4d.nii.gz", (24, 96, 128), None),  # 4D: first volume
        ("example_nifti2.nii.gz", (12, 20, 32), None),  # NIfTI-2
        ("standard.nii.gz", (7, 5, 4), None),
        ("functional.nii", (3, 21, 17), None),  # scaled int16 -> float32
        ("resampled_anat_moved.nii", None, Reason.NON_FINITE_VALUES),  # NaN voxels
        ("row_major.dconn.nii", None, Reason.UNSUPPORTED_NIFTI),  # CIFTI-2 matrix
        ("analyze.hdr", None, Reason.NOT_RECOGNISED),
        ("0.dcm", None, Reason.MOSAIC),  # Siemens mosaic
    ],
)
def test_nibabel_test_data(prep, tmp_path: Path, name: str, shape, reason) -> None:
    (tmp_path / "in").mkdir()
    path = Path(shutil.copy(NIBABEL_DATA / name, tmp_path / "in" / name))
    run = prep(tmp_path / "in")
    if reason is None:
        assert run.row(path).shape == shape
    else:
        assert run.reason(path) == reason.value


def test_nibabel_data_matches_nibabel_values(prep, tmp_path: Path) -> None:
    """anatomical.nii has an L-A-S affine: canonical (S, P, L) flips only the y axis."""
    (tmp_path / "in").mkdir()
    path = Path(shutil.copy(NIBABEL_DATA / "anatomical.nii", tmp_path / "in" / "a.nii"))
    img = nibabel.load(path)
    assert nibabel.aff2axcodes(img.affine) == ("L", "A", "S")
    data = np.asarray(img.dataobj)
    run = prep(tmp_path / "in")
    np.testing.assert_array_equal(run.array(path), data[:, ::-1, :].transpose(2, 1, 0))
