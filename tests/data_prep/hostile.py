"""Hostile inputs for the data_prep tests: byte-mutated compressed DICOM and huge-claim headers.

Everything is built in the test's tmp_path from pydicom's own test files; nothing generated is
committed.
"""

from __future__ import annotations

import copy
import gzip
from pathlib import Path

import numpy as np
import pydicom
from pydicom.uid import generate_uid

from tests.data_prep.factory import PYDICOM_FILES

#: pydicom test files in a compressed transfer syntax that pass the scan (grayscale images with
#: geometry), so their pixel data reaches a decoder: RLE, JPEG baseline/extended, JPEG-LS lossless
#: and near-lossless, JPEG 2000 lossless and lossy.
COMPRESSED_GRAYSCALE = (
    "MR_small_RLE.dcm",
    "JPEG-lossy.dcm",
    "JPGExtended.dcm",
    "MR_small_jpeg_ls_lossless.dcm",
    "JPEGLSNearLossless_08.dcm",
    "JPEGLSNearLossless_16.dcm",
    "MR_small_jp2klossless.dcm",
    "JPEG2000.dcm",
    "693_J2KI.dcm",
    "J2K_pixelrep_mismatch.dcm",
)


def fresh_copy(ds: pydicom.Dataset) -> None:
    """New SOP instance and series UIDs, so each copy is its own series (not a duplicate), and
    BurnedInAnnotation NO: most of these samples are secondary captures or DERIVED\\SECONDARY, which
    the scan refuses otherwise, and these copies are meant to reach the size checks and the decoder."""
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.SeriesInstanceUID = generate_uid()
    ds.BurnedInAnnotation = "NO"


def pixel_mutants(folder: Path, source: str, n: int, seed: int, max_changes: int = 20) -> list[Path]:
    """``n`` copies of a pydicom test file with 1..max_changes random bytes of its pixel data changed.

    The bytes are changed in the written file (item tags and offset tables included), where pydicom
    would refuse to write a broken encapsulation.
    """
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    template = pydicom.dcmread(PYDICOM_FILES / source)
    paths = []
    for k in range(n):
        ds = copy.deepcopy(template)
        fresh_copy(ds)
        path = folder / f"{Path(source).stem}_{k:03d}"
        ds.save_as(path)
        start = pydicom.dcmread(path, defer_size=1).get_item("PixelData", keep_deferred=True).value_tell
        data = bytearray(path.read_bytes())
        for _ in range(int(rng.integers(1, max_changes + 1))):
            data[int(rng.integers(start, len(data)))] = int(rng.integers(256))
        path.write_bytes(bytes(data))
        paths.append(path)
    return paths


def rle_claiming(path: Path, rows: int, columns: int) -> Path:
    """pydicom's 7.8 KB ``MR_small_RLE.dcm`` with a header claiming ``rows x columns``."""
    ds = pydicom.dcmread(PYDICOM_FILES / "MR_small_RLE.dcm")
    fresh_copy(ds)
    ds.Rows, ds.Columns = rows, columns
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path)
    return path


def frames_claiming(source: Path, path: Path, n_frames: int) -> Path:
    """A copy of an enhanced multi-frame file whose NumberOfFrames says ``n_frames``."""
    ds = pydicom.dcmread(source)
    fresh_copy(ds)
    ds.NumberOfFrames = n_frames
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path)
    return path


def nifti_gz_claiming(path: Path, shape: tuple[int, ...], payload: bytes | None = None,
                      zero_bytes: int = 0, compresslevel: int = 6) -> Path:
    """A ``.nii.gz`` whose int16 header claims ``shape``, followed by ``payload`` and/or ``zero_bytes`` zeros
    (written in chunks: a gigabyte of zeros costs a megabyte on disk and no memory here)."""
    import nibabel as nib

    hdr = nib.Nifti1Header()
    hdr.set_data_shape(shape)
    hdr.set_data_dtype(np.int16)
    hdr.set_qform(np.eye(4), code=1)
    hdr.set_sform(np.eye(4), code=1)
    hdr["vox_offset"] = 352
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wb", compresslevel=compresslevel) as f:
        f.write(hdr.binaryblock + b"\0" * 4)
        if payload:
            f.write(payload)
        chunk = bytes(1 << 24)
        left = zero_bytes
        while left > 0:
            f.write(chunk[: min(left, len(chunk))])
            left -= len(chunk)
    return path
