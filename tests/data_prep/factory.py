"""Small real DICOM/NIfTI files for the data_prep tests, written with pydicom and nibabel.

Every builder returns what a correct prep must produce, so tests compare against values computed
here from first principles (not by calling data_prep).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian, RLELossless, generate_uid

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
ENHANCED_MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4.1"
CR_IMAGE = "1.2.840.10008.5.1.4.1.1.1"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"
RT_STRUCT = "1.2.840.10008.5.1.4.1.1.481.3"

PYDICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"


@dataclass
class Identity:
    """The PHI-bearing fields planted in every file (the privacy test overrides them)."""

    patient_id: str = "PAT-0001"
    patient_name: str = "Doe^Jane"
    birth_date: str = "19700101"
    study_date: str = "20200102"
    accession: str = "ACC0001"
    institution: str = "General Hospital"
    station: str = "CT01"
    description: str = "CHEST"
    private_value: str | None = None
    study_uid: str = field(default_factory=generate_uid)

    def apply(self, ds: Dataset) -> None:
        ds.PatientID = self.patient_id
        ds.PatientName = self.patient_name
        ds.PatientBirthDate = self.birth_date
        ds.StudyDate = self.study_date
        ds.SeriesDate = self.study_date
        ds.AcquisitionDate = self.study_date
        ds.ContentDate = self.study_date
        ds.AccessionNumber = self.accession
        ds.InstitutionName = self.institution
        ds.StationName = self.station
        ds.StudyDescription = self.description
        ds.SeriesDescription = self.description
        ds.StudyInstanceUID = self.study_uid
        if self.private_value is not None:
            block = ds.private_block(0x0009, "MEDMAE TEST", create=True)
            block.add_new(0x01, "LO", self.private_value)


@dataclass
class Series:
    """A written series and the (Z, Y, X) array prep must store for it (canonical LPS)."""

    paths: list[Path]
    expected: np.ndarray
    series_uid: str
    sop_uids: list[str]
    affine: np.ndarray  # expected canonical affine (axial series only; identity otherwise)


def base_dataset(sop_class: str, modality: str, identity: Identity, series_uid: str) -> Dataset:
    ds = Dataset()
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    ds.SeriesInstanceUID = series_uid
    identity.apply(ds)
    return ds


def set_pixels(ds: Dataset, pixels: np.ndarray, *, bits_stored: int | None = None) -> None:
    """Attach a 2D (or frames x rows x cols) integer array as Pixel Data."""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = ds.get("PhotometricInterpretation", "MONOCHROME2")
    if pixels.ndim == 3:
        ds.NumberOfFrames = pixels.shape[0]
    ds.Rows, ds.Columns = pixels.shape[-2:]
    ds.BitsAllocated = pixels.dtype.itemsize * 8
    ds.BitsStored = bits_stored or ds.BitsAllocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if pixels.dtype.kind == "i" else 0
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()


def save(ds: Dataset, path: Path, *, compress_rle: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if compress_rle:
        ds.compress(RLELossless, encoding_plugin="pylibjpeg")
    ds.save_as(path, enforce_file_format=True)
    return path


def slice_pattern(k: int, rows: int, cols: int, seed: int) -> np.ndarray:
    """Stored values of slice k: random texture plus a slice-specific offset (so order is testable)."""
    rng = np.random.default_rng(seed * 1000 + k)
    return (rng.integers(0, 1000, size=(rows, cols)) + 100 * k).astype(np.int16)


def volume_series(
    folder: Path,
    *,
    n: int = 5,
    rows: int = 32,
    cols: int = 24,
    pixel_spacing: tuple[float, float] = (0.8, 0.7),
    slice_spacing: float = 2.0,
    origin: Sequence[float] = (-10.0, -12.0, 30.0),
    orientation: Sequence[float] = (1, 0, 0, 0, 1, 0),
    modality: str = "CT",
    slope: float = 1.0,
    intercept: float = -1024.0,
    identity: Identity | None = None,
    series_uid: str | None = None,
    z_positions: Sequence[float] | None = None,
    positions: Sequence[Sequence[float]] | None = None,
    instance_numbers: Sequence[int] | None = None,
    name: Callable[[int], str] = lambda k: f"IM{k:05d}",
    image_type: Sequence[str] = ("ORIGINAL", "PRIMARY", "AXIAL"),
    rle: Sequence[int] = (),
    seed: int = 0,
    extra: Callable[[Dataset, int], None] | None = None,
) -> Series:
    """A CT/MR stack written one file per slice, in *file order* k = 0..n-1.

    Slice k lies at ``origin + z_k * normal`` (``z_k = k * slice_spacing`` unless given), or at
    ``positions[k]``. InstanceNumber defaults to a shuffled permutation so sorting by it would fail.
    """
    identity = identity or Identity()
    series_uid = series_uid or generate_uid()
    o = np.asarray(orientation, dtype=float)
    normal = np.cross(o[:3], o[3:])
    zs = list(z_positions) if z_positions is not None else [k * slice_spacing for k in range(n)]
    n = len(positions) if positions is not None else len(zs)
    rng = np.random.default_rng(seed)
    numbers = list(instance_numbers) if instance_numbers is not None else list(rng.permutation(n) + 1)
    sop_class = CT_IMAGE if modality == "CT" else MR_IMAGE
    paths, sops, slices = [], [], []
    for k in range(n):
        ds = base_dataset(sop_class, modality, identity, series_uid)
        ds.ImageType = list(image_type)
        ds.InstanceNumber = int(numbers[k])
        pos = positions[k] if positions is not None else np.asarray(origin) + zs[k] * normal
        ds.ImagePositionPatient = [float(f"{v:.6f}") for v in pos]
        ds.ImageOrientationPatient = [float(v) for v in orientation]
        ds.PixelSpacing = list(pixel_spacing)
        ds.SliceThickness = slice_spacing
        ds.RescaleSlope = slope
        ds.RescaleIntercept = intercept
        raw = slice_pattern(k, rows, cols, seed)
        set_pixels(ds, raw)
        if extra is not None:
            extra(ds, k)
        slices.append(raw.astype(np.float64) * slope + intercept)
        paths.append(save(ds, folder / name(k), compress_rle=k in rle))
        sops.append(ds.SOPInstanceUID)
    proj = [float(np.dot(positions[k], normal)) for k in range(n)] if positions is not None else zs
    order = np.argsort(proj, kind="stable")
    expected = np.stack([slices[i] for i in order])
    affine = np.eye(4)
    affine[:3, 0] = o[:3] * pixel_spacing[1]
    affine[:3, 1] = o[3:] * pixel_spacing[0]
    affine[:3, 2] = normal * slice_spacing
    affine[:3, 3] = positions[order[0]] if positions is not None else np.asarray(origin) + zs[order[0]] * normal
    return Series(paths, expected, series_uid, sops, affine)


def enhanced_mr(path: Path, *, n: int = 4, rows: int = 16, cols: int = 20, spacing: float = 3.0,
                identity: Identity | None = None, seed: int = 7) -> Series:
    """An Enhanced MR file: frames stored in shuffled position order, geometry per frame."""
    identity = identity or Identity()
    ds = base_dataset(ENHANCED_MR_IMAGE, "MR", identity, generate_uid())
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "NONE"]
    order = np.random.default_rng(seed).permutation(n)  # frame f shows slice order[f]
    frames = np.stack([slice_pattern(int(z), rows, cols, seed) for z in order]).astype(np.uint16)
    shared = Dataset()
    po = Dataset()
    po.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    pm = Dataset()
    pm.PixelSpacing = [1.0, 1.0]
    pm.SliceThickness = spacing
    pv = Dataset()
    pv.RescaleSlope = 1
    pv.RescaleIntercept = 0
    pv.RescaleType = "US"
    shared.PlaneOrientationSequence = DicomSequence([po])
    shared.PixelMeasuresSequence = DicomSequence([pm])
    shared.PixelValueTransformationSequence = DicomSequence([pv])
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])
    per = []
    for f in range(n):
        item = Dataset()
        pp = Dataset()
        pp.ImagePositionPatient = [0.0, 0.0, float(order[f]) * spacing]
        item.PlanePositionSequence = DicomSequence([pp])
        fc = Dataset()
        fc.InStackPositionNumber = int(order[f]) + 1
        item.FrameContentSequence = DicomSequence([fc])
        per.append(item)
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(per)
    set_pixels(ds, frames)
    save(ds, path)
    expected = np.stack([frames[list(order).index(z)] for z in range(n)]).astype(np.float64)
    return Series([path], expected, ds.SeriesInstanceUID, [ds.SOPInstanceUID], np.eye(4))


def cr_image(path: Path, *, identity: Identity | None = None, monochrome1: bool = True) -> Series:
    """A 12-bit CR picture (no patient geometry), MONOCHROME1 by default."""
    identity = identity or Identity()
    ds = base_dataset(CR_IMAGE, "CR", identity, generate_uid())
    ds.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    ds.ImagerPixelSpacing = [0.15, 0.2]
    raw = np.random.default_rng(3).integers(0, 4096, size=(24, 18)).astype(np.uint16)
    set_pixels(ds, raw, bits_stored=12)
    save(ds, path)
    expected = (4095 - raw.astype(np.int64)) if monochrome1 else raw.astype(np.int64)
    return Series([path], expected[None].astype(np.float64), ds.SeriesInstanceUID, [ds.SOPInstanceUID], np.eye(4))


def non_image(path: Path, sop_class: str, modality: str, identity: Identity | None = None) -> Path:
    """An SR / RTSTRUCT-like object: a valid DICOM file with no pixels."""
    ds = base_dataset(sop_class, modality, identity or Identity(), generate_uid())
    ds.ContentDate = "20200101"
    return save(ds, path)


def truncate(path: Path, keep_fraction: float | None = None) -> Path:
    """Cut the tail of a file. By default cut half of a DICOM file's pixel data, so the header
    still reads and only the pixels fail to decode."""
    data = path.read_bytes()
    if keep_fraction is None:
        pixel_bytes = len(pydicom.dcmread(path).PixelData)
        keep = len(data) - pixel_bytes // 2
    else:
        keep = int(len(data) * keep_fraction)
    path.write_bytes(data[:keep])
    return path


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    import nibabel as nib

    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), str(path))
    return path


def write_sidecar(nifti: Path, doc: object) -> Path:
    """The dcm2niix/BIDS JSON sidecar ``<stem>.json`` of a NIfTI file: ``doc`` as JSON, or raw bytes."""
    name = nifti.name.removesuffix(".gz").removesuffix(".nii")
    path = nifti.with_name(name + ".json")
    path.write_bytes(doc if isinstance(doc, bytes) else json.dumps(doc).encode("utf-8"))
    return path


def secondary_capture(path: Path, *, modality: str = "CT", burned_in: str | None = None,
                      identity: Identity | None = None) -> Series:
    """A grayscale Secondary Capture (a screenshot: 8-bit display values, no geometry, no rescale)."""
    ds = base_dataset(SECONDARY_CAPTURE, modality, identity or Identity(), generate_uid())
    ds.ImageType = ["DERIVED", "SECONDARY"]
    if burned_in is not None:
        ds.BurnedInAnnotation = burned_in
    raw = np.random.default_rng(5).integers(0, 256, size=(20, 16)).astype(np.uint8)
    set_pixels(ds, raw)
    save(ds, path)
    return Series([path], raw[None].astype(np.float64), ds.SeriesInstanceUID, [ds.SOPInstanceUID], np.eye(4))
