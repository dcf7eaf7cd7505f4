"""Hostile inputs for the data_prep tests: byte-mutated compressed DICOM, huge-claim headers, deflate
bombs, codestreams that contradict their header, NIfTI files with huge header extensions.

Everything is built in the test's tmp_path from pydicom's own test files; nothing generated is
committed.
"""

from __future__ import annotations

import copy
import gzip
from collections.abc import Sequence
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


# ----------------------------------------------------------------------------- issue 18: streams


#: Tags of the junk element a deflated file carries before its pixel data (private group 7FDF)
#: or after it (7FE1): explicit VR OB, filled with zeros, written in chunks.
JUNK_BEFORE_PIXELS = (0x7FDF, 0x1010)
JUNK_AFTER_PIXELS = (0x7FE1, 0x1010)


def _ob_element(tag: tuple[int, int], length: int) -> bytes:
    """The 12-byte header of an explicit VR little endian OB element."""
    return tag[0].to_bytes(2, "little") + tag[1].to_bytes(2, "little") + b"OB\0\0" + length.to_bytes(4, "little")


def deflated_dicom(source: Path, path: Path, *, junk_before: int = 0, junk_after: int = 0,
                   truncate_to: int | None = None, level: int = 9, fresh: bool = False) -> Path:
    """``source`` (an explicit VR little endian file) rewritten as Deflated Explicit VR Little Endian.

    ``junk_before`` / ``junk_after`` zero bytes ride in a private OB element before / after the
    pixel data (at most 2**32 - 2 each). The deflate stream is written as it is compressed: a
    4 GB bomb costs 16 MB of memory here. ``truncate_to`` cuts the compressed stream; ``fresh``
    gives the copy new UIDs (:func:`fresh_copy`).
    """
    import zlib

    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset, write_file_meta_info
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    ds = pydicom.dcmread(source)
    if fresh:
        fresh_copy(ds)
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, ds)
    encoded = body.getvalue()
    at = encoded.find(b"\xe0\x7f\x10\x00O")  # the Pixel Data element (OB or OW)
    assert at > 0
    meta = DicomBytesIO()
    meta.is_little_endian, meta.is_implicit_VR = True, False
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    write_file_meta_info(meta, ds.file_meta, enforce_standard=True)
    z = zlib.compressobj(level, zlib.DEFLATED, -zlib.MAX_WBITS)
    chunk = bytes(1 << 24)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(b"\0" * 128 + b"DICM" + meta.getvalue())
        start = f.tell()

        def put(data: bytes) -> None:
            f.write(z.compress(data))

        def junk(tag: tuple[int, int], n: int) -> None:
            put(_ob_element(tag, n))
            left = n
            while left > 0:
                put(chunk[: min(left, len(chunk))])
                left -= len(chunk)

        put(encoded[:at])
        if junk_before:
            junk(JUNK_BEFORE_PIXELS, junk_before)
        put(encoded[at:])
        if junk_after:
            junk(JUNK_AFTER_PIXELS, junk_after)
        f.write(z.flush())
    if truncate_to is not None:
        with open(path, "r+b") as f:
            f.truncate(start + truncate_to)
    return path


def codestream_claiming(source: str, path: Path, width: int, height: int, components: int | None = None) -> Path:
    """A copy of a pydicom JPEG / JPEG-LS / JPEG 2000 test file whose first codestream (its SOFn,
    SOF55 or SIZ marker) claims ``width x height`` (and ``components``) while Rows/Columns keep
    the true size. JPEG sizes are 16-bit (at most 65535)."""
    ds = pydicom.dcmread(PYDICOM_FILES / source)
    fresh_copy(ds)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path)
    start = pydicom.dcmread(path, defer_size=1).get_item("PixelData", keep_deferred=True).value_tell
    data = bytearray(path.read_bytes())
    soc = data.find(b"\xff\x4f\xff\x51", start)
    if soc > 0:  # JPEG 2000: Xsiz, Ysiz (offsets 0) and one tile of the whole image; Csiz
        data[soc + 8 : soc + 16] = width.to_bytes(4, "big") + height.to_bytes(4, "big")
        data[soc + 16 : soc + 24] = bytes(8)
        data[soc + 24 : soc + 32] = width.to_bytes(4, "big") + height.to_bytes(4, "big")
        if components is not None:
            data[soc + 40 : soc + 42] = components.to_bytes(2, "big")
    else:
        i = data.find(b"\xff\xd8", start) + 2
        while data[i + 1] not in (0xC0, 0xC1, 0xC2, 0xC3, 0xF7):  # walk the segments to the frame header
            i += 2 + int.from_bytes(data[i + 2 : i + 4], "big")
        data[i + 5 : i + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
        if components is not None:
            data[i + 9] = components
    path.write_bytes(bytes(data))
    return path


def nifti_with_extensions(path: Path, data: np.ndarray, extension_bytes: Sequence[int] = (),
                          claims: Sequence[int] | None = None, vox_offset: float | None = None,
                          scl: tuple[float, float] | None = None) -> Path:
    """A NIfTI-1 file (``.nii.gz`` by name) of ``data`` carrying header extensions.

    Extension k holds ``extension_bytes[k]`` zero bytes (rounded up to 16) and says its size is
    ``claims[k]`` (default: the truth). ``vox_offset`` defaults to where the data really starts.
    Zeros are written in chunks: gigabytes of extensions cost megabytes on disk and no memory here.
    """
    import nibabel as nib

    hdr = nib.Nifti1Header()
    hdr.set_data_shape(data.shape)
    hdr.set_data_dtype(data.dtype)
    hdr.set_qform(np.eye(4), code=1)
    hdr.set_sform(np.eye(4), code=1)
    if scl is not None:
        hdr["scl_slope"], hdr["scl_inter"] = scl
    sizes = [((n + 8 + 15) // 16) * 16 for n in extension_bytes]  # esize: header (8) + content, x16
    claimed = list(claims) if claims is not None else sizes
    offset = 352 + sum(sizes)
    hdr["vox_offset"] = offset if vox_offset is None else vox_offset
    path.parent.mkdir(parents=True, exist_ok=True)
    opener = gzip.open(path, "wb", compresslevel=6) if path.name.endswith(".gz") else open(path, "wb")
    chunk = bytes(1 << 24)
    with opener as f:
        f.write(hdr.binaryblock + (b"\1\0\0\0" if sizes else b"\0\0\0\0"))
        for size, claim in zip(sizes, claimed, strict=True):
            f.write(int(claim).to_bytes(4, "little", signed=True) + (4).to_bytes(4, "little"))  # esize, ecode
            left = size - 8
            while left > 0:
                f.write(chunk[: min(left, len(chunk))])
                left -= len(chunk)
        f.write(np.ascontiguousarray(data).tobytes(order="F"))
    return path


# ----------------------------------------------------------------------------- issue 18: fuzz mutators


def deflated_mutants(folder: Path, source: Path, n: int, seed: int) -> list[Path]:
    """``n`` deflated copies of ``source`` (new UIDs each): zero junk before or after the pixel data
    (none, 1 KiB, 1 MiB, or 70 MiB: past the 64 MiB allowance), then maybe 1-10 random bytes of the
    compressed stream changed, maybe the stream cut short."""
    rng = np.random.default_rng(seed)
    paths = []
    for k in range(n):
        junk = int(rng.choice([0, 1 << 10, 1 << 20, 70 << 20], p=[0.4, 0.2, 0.25, 0.15]))
        where = "junk_before" if rng.random() < 0.5 else "junk_after"
        path = deflated_dicom(source, folder / f"deflated_{k:03d}", fresh=True, **{where: junk})
        data = bytearray(path.read_bytes())
        start = 132 + 12 + pydicom.filereader.read_file_meta_info(path).FileMetaInformationGroupLength
        if rng.random() < 0.5:
            for _ in range(int(rng.integers(1, 11))):
                data[int(rng.integers(start, len(data)))] = int(rng.integers(256))
        if rng.random() < 0.2:
            data = data[: int(rng.integers(start, len(data)))]
        path.write_bytes(bytes(data))
        paths.append(path)
    return paths


#: SIZ values a mutant draws from: around the true 64, and huge.
_SIZ_VALUES = (0, 1, 63, 64, 65, 128, 4096, 60000, 2**31, 2**32 - 1)


def j2k_siz_mutants(folder: Path, n: int, seed: int, source: str = "MR_small_jp2klossless.dcm") -> list[Path]:
    """``n`` copies of a pydicom JPEG 2000 file whose SIZ marker fields (image and tile size and
    offsets, component count, subsampling, segment length) take random values, some with a few
    random bytes of the codestream's first 200 changed too."""
    rng = np.random.default_rng(seed)
    template = pydicom.dcmread(PYDICOM_FILES / source)
    paths = []
    for k in range(n):
        ds = copy.deepcopy(template)
        fresh_copy(ds)
        path = folder / f"j2k_{k:03d}"
        path.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(path)
        data = bytearray(path.read_bytes())
        soc = data.find(b"\xff\x4f\xff\x51")
        for field in range(8):  # Xsiz, Ysiz, XOsiz, YOsiz, XTsiz, YTsiz, XTOsiz, YTOsiz
            if rng.random() < 0.3:
                at = soc + 8 + 4 * field
                data[at : at + 4] = int(rng.choice(_SIZ_VALUES)).to_bytes(4, "big")
        if rng.random() < 0.2:
            data[soc + 40 : soc + 42] = int(rng.choice([0, 1, 3, 4, 16384])).to_bytes(2, "big")
        if rng.random() < 0.1:
            data[soc + 43 + int(rng.integers(0, 2))] = int(rng.integers(256))  # XRsiz / YRsiz
        if rng.random() < 0.1:
            data[soc + 4 : soc + 6] = int(rng.integers(0, 1 << 16)).to_bytes(2, "big")  # Lsiz
        if rng.random() < 0.3:
            for _ in range(int(rng.integers(1, 9))):
                data[soc + int(rng.integers(0, 200))] = int(rng.integers(256))
        path.write_bytes(bytes(data))
        paths.append(path)
    return paths


def nifti_extension_mutants(folder: Path, n: int, seed: int) -> list[Path]:
    """``n`` small NIfTI files (``.nii`` or ``.nii.gz``) with 0-3 header extensions of 0 B to 1 MiB,
    whose size claims and ``vox_offset`` are the truth or random (2 GiB, negative, past the file,
    inside the extensions); some ``.nii`` have a few random header bytes changed as well."""
    rng = np.random.default_rng(seed)
    paths = []
    for k in range(n):
        data = rng.integers(-1000, 1000, size=(4, 5, 6)).astype(np.int16)
        sizes = [int(rng.choice([0, 8, 100, 1 << 20])) for _ in range(int(rng.integers(0, 4)))]
        claims = None
        if sizes and rng.random() < 0.5:
            truth = [((n + 8 + 15) // 16) * 16 for n in sizes]
            claims = [int(rng.choice([0, 7, 16, -16, 2**30, 2**31 - 16])) if rng.random() < 0.5 else t for t in truth]
        vox_offset = None
        if rng.random() < 0.4:
            vox_offset = float(rng.choice([0, 351, 352, 368, 2**31, 1e12, -1, 1 << 20]))
        suffix = ".nii.gz" if rng.random() < 0.5 else ".nii"
        path = nifti_with_extensions(folder / f"ext_{k:03d}{suffix}", data, sizes, claims=claims,
                                     vox_offset=vox_offset)
        if suffix == ".nii" and rng.random() < 0.2:
            raw = bytearray(path.read_bytes())
            for _ in range(int(rng.integers(1, 6))):
                raw[int(rng.integers(0, 352))] = int(rng.integers(256))
            path.write_bytes(bytes(raw))
        paths.append(path)
    return paths
