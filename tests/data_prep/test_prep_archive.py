"""End-to-end prep of one messy synthetic archive: each case ends in the right series or reason."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from pydicom.uid import generate_uid

from data_prep import Reason
from medmae.data.cache import STAT_KEYS, built_series_ids, compute_stats, read_sidecar
from tests.data_prep.conftest import PrepRun, run_prep
from tests.data_prep.factory import (
    BASIC_TEXT_SR,
    PYDICOM_FILES,
    RT_STRUCT,
    Identity,
    Series,
    base_dataset,
    cr_image,
    enhanced_mr,
    non_image,
    save,
    secondary_capture,
    set_pixels,
    truncate,
    volume_series,
    write_nifti,
    write_sidecar,
)


class Archive:
    """Builds the messy archive and remembers what each part must become."""

    def __init__(self, root: Path) -> None:
        self.root = root
        a = root
        self.mixed_ct = volume_series(a / "mixed", n=6, name=lambda k: f"a{k:03d}", seed=1)
        self.mixed_mr = volume_series(a / "mixed", n=4, modality="MR", intercept=0, name=lambda k: f"b{k:03d}",
                                      seed=2, origin=(0, 0, -20), slice_spacing=3.0)
        self.dups = volume_series(a / "dups", n=5, seed=3)
        self.dup_copies = [shutil.copy(self.dups.paths[i], a / "dups" / f"copy{i}") for i in (1, 3)]
        self.loc = volume_series(a / "loc", n=5, seed=4)
        self.localizer = self._localizer(a / "loc" / "scout", self.loc.series_uid)
        self.gap = volume_series(a / "gap", z_positions=[0, 2, 4, 8, 10], seed=5)
        self.uneven = volume_series(a / "uneven", z_positions=[0, 2, 4.5, 6, 8], seed=6)
        self.tilt = volume_series(a / "tilt", positions=[(0, 1.2 * k, 2.0 * k) for k in range(5)], seed=7)
        self.overlap = volume_series(a / "overlap", z_positions=[0, 2, 4, 2, 6], seed=8)
        self.sr = non_image(a / "reports" / "sr1", BASIC_TEXT_SR, "SR")
        self.rtstruct = non_image(a / "reports" / "rts1", RT_STRUCT, "RTSTRUCT")
        self.real_sr = Path(shutil.copy(PYDICOM_FILES / "test-SR.dcm", a / "reports" / "real_sr"))
        self.real_rts = Path(shutil.copy(PYDICOM_FILES / "rtstruct.dcm", a / "reports" / "real_rtstruct"))
        self.trunc_end = volume_series(a / "trunc_end", n=5, seed=9)
        truncate(self.trunc_end.paths[4])  # highest slice: the stack stays valid without it
        self.trunc_mid = volume_series(a / "trunc_mid", n=5, seed=10)
        truncate(self.trunc_mid.paths[2])  # middle slice: a hole -> missing_slices
        self.rle = volume_series(a / "rle", n=4, rle=(1, 3), seed=11)
        self.cr = cr_image(a / "cr" / "chest")
        self.enhanced = enhanced_mr(a / "enhanced" / "mf")
        self.raw = self._raw_series(a / "raw", n=3)
        self.multiecho = self._multiecho(a / "multiecho")
        self.acq = self._two_acquisitions(a / "acq")
        self.single = volume_series(a / "single", n=1, seed=12)
        self.color = self._color(a / "color" / "photo")
        self.junk = a / "junk" / "notes.txt"
        self.junk.parent.mkdir(parents=True)
        self.junk.write_text("Doctor's notes, not an image\n" * 20)
        self.blob = a / "junk" / "blob"
        self.blob.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
        self.empty = a / "junk" / "empty"
        self.empty.write_bytes(b"")
        self.dicomdir = Path(shutil.copy(PYDICOM_FILES / "dicomdirtests" / "DICOMDIR", a / "junk" / "DICOMDIR"))
        self.broken_link = a / "junk" / "dangling"
        os.symlink(a / "does-not-exist", self.broken_link)
        # NIfTI
        rng = np.random.default_rng(13)
        self.nii_3d_data = rng.integers(-100, 100, size=(6, 5, 4)).astype(np.int16)
        self.nii_3d = write_nifti(a / "nifti" / "scan.nii.gz", self.nii_3d_data)
        self.nii_3d_sidecar = write_sidecar(self.nii_3d, {"Modality": "CT", "PatientName": "Doe^Jane"})
        self.orphan_sidecar = write_sidecar(a / "nifti" / "gone.nii", {"Modality": "CT"})
        self.nii_4d_data = rng.integers(0, 50, size=(4, 3, 2, 3)).astype(np.uint8)
        self.nii_4d = write_nifti(a / "nifti" / "fmri.nii", self.nii_4d_data)
        nan = rng.normal(size=(4, 4, 3)).astype(np.float32)
        nan[1, 2, 0] = np.nan
        self.nii_nan = write_nifti(a / "nifti" / "nan.nii", nan)
        self.nii_trunc = write_nifti(a / "nifti" / "trunc.nii.gz", rng.normal(size=(30, 30, 30)).astype(np.float32))
        truncate(self.nii_trunc, 0.5)
        self.nii_junk = a / "nifti" / "junk.nii"
        self.nii_junk.write_bytes(b"not a nifti at all" * 30)
        self.nii_junk_sidecar = write_sidecar(self.nii_junk, {"Modality": "MR"})
        self.screenshot = secondary_capture(a / "screens" / "shot").paths[0]
        self.bids = write_nifti(a / "bids" / "sub-01" / "anat" / "sub-01_T1w.nii.gz",
                                rng.integers(0, 300, size=(5, 4, 3)).astype(np.int16))
        self.bids_func = write_nifti(a / "bids" / "sub-01" / "func" / "sub-01_bold.nii.gz",
                                     rng.integers(0, 300, size=(5, 4, 3, 2)).astype(np.int16))
        # a folder we cannot list
        self.locked_dir = a / "locked"
        self.locked = volume_series(self.locked_dir, n=2, seed=14)

    def _localizer(self, path: Path, series_uid: str) -> Path:
        ds = base_dataset("1.2.840.10008.5.1.4.1.1.2", "CT", Identity(), series_uid)
        ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
        ds.ImagePositionPatient = [0, -100, 50]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
        ds.PixelSpacing = [1, 1]
        set_pixels(ds, np.zeros((32, 24), np.int16))
        return save(ds, path)

    def _raw_series(self, folder: Path, n: int) -> Series:
        """Files without preamble, without file meta and without extension."""
        s = volume_series(folder, n=n, seed=15, name=lambda k: f"tmp{k}")
        for p in s.paths:
            import pydicom

            ds = pydicom.dcmread(p)
            del ds.file_meta
            ds.preamble = None
            ds.save_as(p, implicit_vr=True, little_endian=True, enforce_file_format=False)
            assert p.read_bytes()[128:132] != b"DICM"
        return s

    def _multiecho(self, folder: Path) -> list[Series]:
        uid = generate_uid()
        return [
            volume_series(folder, n=3, modality="MR", intercept=0, series_uid=uid, seed=16 + echo,
                          name=lambda k, e=echo: f"e{e}_{k}",
                          extra=lambda ds, k, e=echo: setattr(ds, "EchoNumbers", e) or setattr(ds, "EchoTime", 10 * e))
            for echo in (1, 2)
        ]

    def _two_acquisitions(self, folder: Path) -> list[Series]:
        uid = generate_uid()
        return [
            volume_series(folder, n=3, series_uid=uid, seed=20 + acq, name=lambda k, a=acq: f"acq{a}_{k}",
                          extra=lambda ds, k, a=acq: setattr(ds, "AcquisitionNumber", a))
            for acq in (1, 2)
        ]

    def _color(self, path: Path) -> Path:
        ds = base_dataset("1.2.840.10008.5.1.4.1.1.7", "OT", Identity(), generate_uid())
        rgb = np.zeros((8, 8, 3), np.uint8)
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
        ds.Rows = ds.Columns = 8
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        ds.PixelData = rgb.tobytes()
        return save(ds, path)

    def all_files(self) -> list[Path]:
        return [Path(r) / f for r, _, fs in os.walk(self.root) for f in fs]


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Archive:
    return Archive(tmp_path_factory.mktemp("messy") / "archive")


def _locked(archive: Archive, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the locked folder unlistable: chmod 000, and (as root, where that does not bite) a
    scandir that refuses it the way the kernel would for a normal user."""
    os.chmod(archive.locked_dir, 0o000)
    if os.geteuid() == 0:
        real = os.scandir

        def scandir(path=".", *a, **k):
            if os.path.realpath(path) == os.path.realpath(archive.locked_dir):
                raise PermissionError(13, "Permission denied", os.fspath(path))
            return real(path, *a, **k)

        monkeypatch.setattr(os, "scandir", scandir)


@pytest.fixture(scope="module")
def run(archive: Archive, tmp_path_factory: pytest.TempPathFactory) -> PrepRun:
    out = tmp_path_factory.mktemp("out") / "cache"
    with pytest.MonkeyPatch.context() as mp:
        _locked(archive, mp)
        try:
            return run_prep(archive.root, out, workers=1)
        finally:
            os.chmod(archive.locked_dir, 0o755)


# ----------------------------------------------------------------------------- accounting


def test_every_file_is_accounted_for(archive: Archive, run: PrepRun) -> None:
    files = [p for p in archive.all_files() if archive.locked_dir not in p.parents]
    r = run.report
    assert r["files_seen"] == len(files)
    assert r["files_in_built_series"] + r["files_rejected"] == r["files_seen"]
    assert sum(r["counts"].values()) == r["files_rejected"] + r["directories_unreadable"]
    for p in files:  # each file: rejected with a code, or in exactly one built series
        reason = run.reason(p)
        if reason is None:
            run.row(p)
        else:
            assert reason in {x.value for x in Reason}
    assert r["series_in_manifest"] == len(run.manifest.rows)
    assert run.summary.series_built == len(run.manifest.rows) and run.summary.series_skipped == 0


def test_unreadable_folder_is_counted_not_fatal(run: PrepRun) -> None:
    assert run.report["counts"]["unreadable_directory"] == 1
    assert run.report["directories_unreadable"] == 1


def test_manifest_rows_match_sidecars_and_arrays(run: PrepRun) -> None:
    assert built_series_ids(run.out) == sorted(r.series_id for r in run.manifest.rows)
    for row in run.manifest.rows:
        side = read_sidecar(run.out, row.series_id)
        assert side.to_json() == {k: v for k, v in row.to_json().items() if k != "split"}
        arr = np.load(run.out / row.array, mmap_mode="r")
        assert tuple(arr.shape) == row.shape and str(arr.dtype) == row.dtype
        assert row.stats == pytest.approx(compute_stats(arr)) and set(row.stats) == set(STAT_KEYS)
        assert row.intensity == ("HU" if row.modality == "CT" else "raw")  # no CT secondary capture kept here
        assert (row.modality_source == "dicom") == (row.source == "dicom")


# ----------------------------------------------------------------------------- series that must come out


def test_two_series_in_one_folder_with_shuffled_instance_numbers(archive: Archive, run: PrepRun) -> None:
    ct, mr = run.row(archive.mixed_ct.paths[0]), run.row(archive.mixed_mr.paths[0])
    assert ct.series_id != mr.series_id
    assert (ct.modality, ct.shape, ct.dtype) == ("CT", (6, 32, 24), "int16")
    assert (mr.modality, mr.shape) == ("MR", (4, 32, 24))
    np.testing.assert_array_equal(run.array(archive.mixed_ct.paths[0]), archive.mixed_ct.expected)
    np.testing.assert_array_equal(run.array(archive.mixed_mr.paths[0]), archive.mixed_mr.expected)
    np.testing.assert_allclose(np.array(ct.affine), archive.mixed_ct.affine, atol=1e-5)
    assert ct.spacing == pytest.approx((2.0, 0.8, 0.7))
    assert len(run.files_of(ct)) == 6 and len(run.files_of(mr)) == 4


def test_duplicate_instances_are_dropped(archive: Archive, run: PrepRun) -> None:
    for copy in archive.dup_copies:
        assert run.reason(Path(copy)) == Reason.DUPLICATE_INSTANCE
    np.testing.assert_array_equal(run.array(archive.dups.paths[0]), archive.dups.expected)


def test_localizer_is_dropped_and_its_series_survives(archive: Archive, run: PrepRun) -> None:
    assert run.reason(archive.localizer) == Reason.LOCALIZER
    assert run.row(archive.loc.paths[0]).shape == (5, 32, 24)


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("gap", Reason.MISSING_SLICES),
        ("uneven", Reason.UNEVEN_SPACING),
        ("tilt", Reason.GANTRY_TILT),
        ("overlap", Reason.OVERLAPPING_SLICES),
    ],
)
def test_invalid_stacks_are_rejected_whole(archive: Archive, run: PrepRun, case: str, reason: Reason) -> None:
    series: Series = getattr(archive, case)
    assert [run.reason(p) for p in series.paths] == [reason.value] * len(series.paths)


def test_non_image_objects_are_rejected(archive: Archive, run: PrepRun) -> None:
    for p in (archive.sr, archive.rtstruct, archive.real_sr, archive.real_rts):
        assert run.reason(p) == Reason.NON_IMAGE_SOP


def test_truncated_top_slice_is_dropped_and_the_rest_built(archive: Archive, run: PrepRun) -> None:
    bad = archive.trunc_end.paths[4]
    assert run.reason(bad) == Reason.PIXEL_DECODE_FAILED
    np.testing.assert_array_equal(run.array(archive.trunc_end.paths[0]), archive.trunc_end.expected[:4])


def test_truncated_middle_slice_leaves_a_hole(archive: Archive, run: PrepRun) -> None:
    reasons = [run.reason(p) for p in archive.trunc_mid.paths]
    assert reasons == ["missing_slices", "missing_slices", "pixel_decode_failed", "missing_slices", "missing_slices"]


@pytest.mark.parametrize(
    ("attr", "reason"),
    [
        ("junk", Reason.NOT_RECOGNISED),
        ("blob", Reason.NOT_RECOGNISED),
        ("empty", Reason.EMPTY_FILE),
        ("dicomdir", Reason.DICOMDIR),
        ("broken_link", Reason.UNREADABLE_FILE),
        ("color", Reason.COLOR_IMAGE),
        ("nii_nan", Reason.NON_FINITE_VALUES),
        ("nii_trunc", Reason.PIXEL_DECODE_FAILED),
        ("nii_junk", Reason.NIFTI_UNREADABLE),
        ("nii_junk_sidecar", Reason.SIDECAR_OF_REJECTED_NIFTI),
        ("orphan_sidecar", Reason.NOT_RECOGNISED),
        ("screenshot", Reason.SECONDARY_CAPTURE),
    ],
)
def test_file_level_rejects(archive: Archive, run: PrepRun, attr: str, reason: Reason) -> None:
    assert run.reason(getattr(archive, attr)) == reason.value


def test_rle_compressed_slices_decode_to_the_same_values(archive: Archive, run: PrepRun) -> None:
    np.testing.assert_array_equal(run.array(archive.rle.paths[0]), archive.rle.expected)


def test_monochrome1_cr_is_an_inverted_2d_image(archive: Archive, run: PrepRun) -> None:
    row = run.row(archive.cr.paths[0])
    assert (row.kind, row.modality, row.shape, row.dtype) == ("image", "CR", (1, 24, 18), "int16")
    assert row.spacing == pytest.approx((1.0, 0.15, 0.2))
    np.testing.assert_array_equal(run.array(archive.cr.paths[0]), archive.cr.expected)


def test_enhanced_multiframe_is_sorted_by_per_frame_position(archive: Archive, run: PrepRun) -> None:
    row = run.row(archive.enhanced.paths[0])
    assert (row.kind, row.shape, row.spacing) == ("volume", (4, 16, 20), pytest.approx((3.0, 1.0, 1.0)))
    np.testing.assert_array_equal(run.array(archive.enhanced.paths[0]), archive.enhanced.expected)


def test_dataset_without_preamble_or_extension_is_read(archive: Archive, run: PrepRun) -> None:
    np.testing.assert_array_equal(run.array(archive.raw.paths[0]), archive.raw.expected)


@pytest.mark.parametrize("case", ["multiecho", "acq"])
def test_series_split_by_echo_and_acquisition(archive: Archive, run: PrepRun, case: str) -> None:
    parts: list[Series] = getattr(archive, case)
    rows = [run.row(s.paths[0]) for s in parts]
    assert len({r.series_id for r in rows}) == 2
    for s in parts:
        np.testing.assert_array_equal(run.array(s.paths[0]), s.expected)


def test_single_slice_is_a_one_slice_volume(archive: Archive, run: PrepRun) -> None:
    row = run.row(archive.single.paths[0])
    assert (row.kind, row.shape, row.spacing[0]) == ("volume", (1, 32, 24), 2.0)


def test_nifti_volumes_are_canonical_lps(archive: Archive, run: PrepRun) -> None:
    # identity affine: voxel axes point to R, A, S -> canonical flips x and y
    expected = archive.nii_3d_data[::-1, ::-1, :].transpose(2, 1, 0)
    np.testing.assert_array_equal(run.array(archive.nii_3d), expected)
    row = run.row(archive.nii_3d)
    # its dcm2niix-style sidecar says CT: stored and labelled like a DICOM CT, the sidecar in its series
    assert (row.source, row.modality, row.intensity, row.dtype) == ("nifti", "CT", "HU", "int16")
    assert row.modality_source == "sidecar" and run.row(archive.nii_3d_sidecar) == row
    plain = run.row(archive.nii_4d)  # no sidecar, no BIDS suffix, no rule
    assert (plain.modality, plain.intensity, plain.modality_source) == ("OT", "raw", "default")
    # LPS affine: voxel (0,0,0) of the flipped array is RAS (5, 4, 0) -> LPS (-5, -4, 0)
    np.testing.assert_allclose(np.array(row.affine)[:3, 3], [-5.0, -4.0, 0.0])


def test_4d_nifti_keeps_its_first_volume(archive: Archive, run: PrepRun) -> None:
    expected = archive.nii_4d_data[..., 0][::-1, ::-1, :].transpose(2, 1, 0)
    np.testing.assert_array_equal(run.array(archive.nii_4d), expected)


def test_bids_subject_is_the_patient(archive: Archive, run: PrepRun) -> None:
    anat, func = run.row(archive.bids), run.row(archive.bids_func)
    assert anat.patient_id == func.patient_id and anat.series_id != func.series_id
    assert anat.modality == func.modality == "MR"
    assert anat.modality_source == func.modality_source == "bids_suffix"
    assert run.row(archive.nii_3d).patient_id != anat.patient_id


def test_split_is_per_patient(archive: Archive, run: PrepRun) -> None:
    split_of: dict[str, set[str]] = {}
    for row in run.manifest.rows:
        split_of.setdefault(row.patient_id, set()).add(row.split)
    assert all(len(s) == 1 for s in split_of.values())


def test_parallel_run_writes_the_same_bytes(archive: Archive, run: PrepRun, tmp_path: Path) -> None:
    out = tmp_path / "cache"
    with pytest.MonkeyPatch.context() as mp:
        _locked(archive, mp)
        try:
            run_prep(archive.root, out, workers=2, salt_file=run.summary.salt_file)
        finally:
            os.chmod(archive.locked_dir, 0o755)
    for name in ("manifest.json", "reject_report.json"):
        assert (out / name).read_bytes() == (run.out / name).read_bytes()


def test_all_files_of_a_series_share_modality_geometry(archive: Archive, run: PrepRun) -> None:
    """Sanity: no manifest row mixes files from two source series."""
    ct_files = {os.path.abspath(p) for p in archive.mixed_ct.paths}
    for row in run.manifest.rows:
        files = set(run.files_of(row))
        assert files <= ct_files or not files & ct_files

