"""Decode: pixels -> modality-LUT values -> the stored dtype (per-modality policy).

Policy (docs/data_prep.md, "Intensities and dtypes"):

* values are the modality-LUT output: RescaleSlope/Intercept (or a Modality LUT Sequence) applied, so
  CT is in HU; other modalities keep their scanner units (``intensity = "raw"``). Whether a series
  is HU is the plan's decision (``SeriesPlan.hu``: CT, but not a CT secondary capture);
* MONOCHROME1 is inverted within the value range the header allows (``lo + hi - v``), so higher is
  brighter for every stored image, and integers stay integers;
* HU is stored as ``int16`` when every value is an integer in int16 range, else ``float32``;
* everything else uses the smallest of ``uint8``, ``int16``, ``uint16`` holding every value exactly
  (that order), else ``float32``;
* NaN/Inf anywhere rejects the file (``non_finite_values``); nothing is silently cleaned. Values are
  checked as stored: after the rescale and after the cast to ``float32`` (1e39 is finite in float64,
  ``inf`` in float32).

Sizes come from the stream that is decoded (:mod:`data_prep.streams`): deflated files are inflated
under a budget, JPEG / JPEG-LS / JPEG 2000 frames are checked against the header before decoding.

Each file is decoded exactly once: a multi-frame file hands out all the frames a plan needs.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from data_prep.sources.base import open_instance
from data_prep.streams import (  # noqa: F401 (DeclaredSizeError, StreamTooLarge, SizeMismatch: re-exported)
    DeclaredSizeError,
    SizeMismatch,
    StreamTooLarge,
    check_codestreams,
    read_dicom,
    read_nifti_header,
)

_INT_CANDIDATES_CT = (np.int16,)
_INT_CANDIDATES = (np.uint8, np.int16, np.uint16)


class NonFiniteValues(ValueError):
    """The decoded values contain NaN or +/-Inf (or would, once stored as float32)."""


#: PackBits (RLE Lossless) turns at most 128 output bytes out of 2 input bytes.
_RLE_MAX_EXPANSION = 64
#: Deflate (gzip) turns at most ~1032 output bytes out of 1 input byte.
_DEFLATE_MAX_EXPANSION = 1032


def check_dicom_pixel_bytes(ds: Any, size: int, rows: int, columns: int, n_frames: int) -> None:
    """Compare the size the header declares with the pixel bytes present, before any decoding.

    ``size`` is the length of the stream the dataset was read from (the file; the inflated dataset
    of a deflated file). Native (uncompressed or deflated) data must hold Rows x Columns x frames x
    bytes per sample; RLE data cannot expand more than 64-fold. JPEG, JPEG-LS and JPEG 2000 frames
    are checked against their codestream headers (:func:`data_prep.streams.check_codestreams`).

    Raises:
        DeclaredSizeError: the file cannot hold what the header declares.
    """
    elem = ds.get_item("PixelData", keep_deferred=True)  # a deferred element: its offset, nothing read
    if elem is None:
        return  # float pixel data or none at all: pydicom says what is wrong
    syntax = ds.file_meta.TransferSyntaxUID
    bits = int(ds.get("BitsAllocated") or 16)
    declared = rows * columns * n_frames * max(1, (bits + 7) // 8)
    value = getattr(elem, "value", None)
    if value is not None:
        present = len(value)
    else:
        present = max(0, size - int(elem.value_tell))
        if elem.length != 0xFFFFFFFF:
            present = min(present, int(elem.length))
    if not syntax.is_compressed:
        if present < declared:
            raise DeclaredSizeError(f"pixel data holds {present} bytes, the header declares {declared}")
    elif syntax == "1.2.840.10008.1.2.5":  # RLE Lossless
        if declared > _RLE_MAX_EXPANSION * present + 1024 * n_frames:
            raise DeclaredSizeError(f"{present} bytes of RLE data cannot hold the {declared} bytes declared")


# ----------------------------------------------------------------------------- DICOM


def read_dicom_frames(path: str, frames: Sequence[int], rows: int, columns: int) -> tuple[dict[int, np.ndarray], Any]:
    """Decode the requested frames of one DICOM file (pydicom + pylibjpeg decoders).

    Returns ``({frame: stored values}, dataset)``; the dataset is kept for a Modality LUT Sequence.
    Raises on truncated/corrupt pixel data or a matrix that disagrees with the header; before
    decoding: :class:`DeclaredSizeError` when the file is too short for the header or a frame has
    no readable codestream header, :class:`SizeMismatch` when a codestream declares another size,
    :class:`StreamTooLarge` when a deflated dataset inflates past its budget.
    """
    import pydicom

    # force: scan already recognised it (bare datasets too); defer: vendor blobs are never read,
    # the pixel data is read once, straight into the decoder. Deflated data is inflated under a budget.
    with open_instance(path) as f:  # a file, or an instance pulled from a PACS into memory (data_prep.sources)
        read = read_dicom(f, force=True, header_only=False, defer_size="4 KB")
    ds = read.ds
    if "TransferSyntaxUID" not in ds.file_meta:  # a bare dataset: its encoding is the syntax
        implicit, little = ds.original_encoding
        ds.file_meta.TransferSyntaxUID = (
            pydicom.uid.ImplicitVRLittleEndian
            if implicit
            else pydicom.uid.ExplicitVRLittleEndian if little else pydicom.uid.ExplicitVRBigEndian
        )
    n_frames = int(ds.get("NumberOfFrames") or 1)
    check_dicom_pixel_bytes(ds, read.size, rows, columns, n_frames)
    check_codestreams(ds, rows, columns, n_frames)
    arr = ds.pixel_array
    if n_frames == 1 and arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3 or arr.shape[1:] != (rows, columns) or arr.shape[0] < n_frames:
        raise ValueError(f"pixel array {arr.shape} does not match the header ({n_frames}, {rows}, {columns})")
    return {f: arr[f] for f in frames}, ds


def stored_range(bits_stored: int, pixel_representation: int) -> tuple[int, int]:
    """Range of the stored pixel values the header allows."""
    bits = max(1, min(int(bits_stored), 32))
    if pixel_representation == 1:
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


def lut_output_range(lut_dataset: Any) -> tuple[float, float]:
    """``(lo, hi)`` over every output of the dataset's Modality LUT.

    The LUT's outputs are read the way pydicom applies them (every input the LUT maps, from its
    descriptor), so ``LUTData`` stored as OW bytes works as well as the multi-valued US form.
    """
    from pydicom.pixels import apply_modality_lut

    entries, first = (int(v) for v in lut_dataset.ModalityLUTSequence[0].LUTDescriptor[:2])
    inputs = np.arange(first, first + (entries or 65536), dtype=np.int64)  # 0 entries means 2**16
    outputs = np.asarray(apply_modality_lut(inputs, lut_dataset))
    return float(outputs.min()), float(outputs.max())


def modality_values(
    raw: np.ndarray,
    slope: float,
    intercept: float,
    *,
    lut_dataset: Any = None,
    monochrome1: bool = False,
    bits_stored: int = 16,
    pixel_representation: int = 0,
) -> np.ndarray:
    """Stored values -> modality-LUT output (integer arithmetic when the rescale is integral).

    MONOCHROME1 is inverted as ``lo + hi - v`` where ``[lo, hi]`` is the output range of all the
    stored values the header allows (or of the LUT), which keeps the range and exactness.
    """
    if lut_dataset is not None:
        from pydicom.pixels import apply_modality_lut

        values = np.asarray(apply_modality_lut(raw, lut_dataset))
        lo, hi = lut_output_range(lut_dataset)
    elif raw.dtype.kind == "f":
        values = raw.astype(np.float64) * slope + intercept if (slope != 1 or intercept != 0) else raw
        lo, hi = (float(np.min(values)), float(np.max(values))) if monochrome1 else (0.0, 0.0)
    else:
        smin, smax = stored_range(bits_stored, pixel_representation)
        ends = (smin * slope + intercept, smax * slope + intercept)
        lo, hi = min(ends), max(ends)
        info = np.iinfo(raw.dtype)
        reach = max(-int(info.min), int(info.max)) * abs(float(slope)) + abs(float(intercept))
        # integer arithmetic only where no stored value can overflow int64 (a slope of 1e38 is "integral")
        if float(slope).is_integer() and float(intercept).is_integer() and reach < 2**62:
            wide = np.int32 if raw.itemsize <= 2 and abs(slope) < 2**14 and abs(intercept) < 2**30 else np.int64
            values = raw.astype(wide, copy=raw.dtype != wide)
            if slope != 1:
                values *= int(slope)
            if intercept != 0:
                values += int(intercept)
        else:
            values = raw.astype(np.float64) * slope + intercept
    if monochrome1:
        total = lo + hi
        if values.dtype.kind in "iu" and float(total).is_integer():
            values = np.int64(total) - values.astype(np.int64)
        else:
            values = total - values.astype(np.float64)
    return values


# ----------------------------------------------------------------------------- dtype policy


def storage_dtype(hu: bool, integral: bool, lo: float, hi: float) -> np.dtype:
    """The storage dtype for values in ``[lo, hi]``, HU or not (see module docstring)."""
    if integral:
        for cand in _INT_CANDIDATES_CT if hu else _INT_CANDIDATES:
            info = np.iinfo(cand)
            if info.min <= lo and hi <= info.max:
                return np.dtype(cand)
    return np.dtype(np.float32)


def compact(values: np.ndarray) -> tuple[np.ndarray, bool, float, float]:
    """One slice/volume's values in a compact exact form: ``(array, integral, min, max)``.

    Integer-valued floats become integers; non-integral floats become float32 (the final dtype
    then has to be float32 anyway). Raises :class:`NonFiniteValues` on NaN/Inf, and on values
    beyond float32's range (finite in float64, infinite once stored): finiteness is checked on the
    values as they will be stored.
    """
    if values.size == 0:
        raise ValueError("empty pixel array")
    if values.dtype.kind == "f":
        if not np.isfinite(values).all():
            raise NonFiniteValues("NaN or Inf values")
        lo, hi = float(values.min()), float(values.max())
        if np.array_equal(values, np.round(values)) and -(2**62) < lo and hi < 2**62:
            values = values.astype(np.int64)
        else:
            stored = values.astype(np.float32, copy=values.dtype != np.float32)
            if not np.isfinite(stored).all():
                raise NonFiniteValues("values beyond the float32 range")
            return stored, False, float(stored.min()), float(stored.max())
    lo, hi = int(values.min()), int(values.max())
    for cand in (np.uint8, np.int8, np.int16, np.uint16, np.int32, np.int64):
        info = np.iinfo(cand)
        if info.min <= lo and hi <= info.max:
            return values.astype(cand, copy=values.dtype != cand), True, float(lo), float(hi)
    raise AssertionError("unreachable")


class StackAssembler:
    """Collects slices (each already :func:`compact`) and emits one array in the policy dtype.

    Keeping slices compact until the dtype is known keeps peak memory near twice the final array.
    """

    def __init__(self) -> None:
        self._slices: list[np.ndarray] = []
        self._integral = True
        self._lo = float("inf")
        self._hi = float("-inf")

    def add(self, values: np.ndarray) -> None:
        self.add_compact(compact(values))

    def add_compact(self, compacted: tuple[np.ndarray, bool, float, float]) -> None:
        """Add a slice already :func:`compact`-ed (so a caller can refuse a non-finite one first)."""
        arr, integral, lo, hi = compacted
        self._slices.append(arr)
        self._integral &= integral
        self._lo, self._hi = min(self._lo, lo), max(self._hi, hi)

    def __len__(self) -> int:
        return len(self._slices)

    def finish(self, hu: bool) -> np.ndarray:
        """All slices as one (k, rows, columns) array in the policy dtype (``hu``: Hounsfield units)."""
        dtype = storage_dtype(hu, self._integral, self._lo, self._hi)
        out = np.empty((len(self._slices),) + self._slices[0].shape, dtype=dtype)
        for k, s in enumerate(self._slices):
            out[k] = s
        self._slices.clear()
        return out


def store_values(values: np.ndarray, modality: str = "OT", *, hu: bool | None = None) -> np.ndarray:
    """A whole array (NIfTI volume) in the policy dtype.

    data_prep passes its plan's ``hu``; callers that know only a modality (``medmae.finetune``)
    leave it None, meaning ``modality == "CT"``.
    """
    arr, integral, lo, hi = compact(values)
    return arr.astype(storage_dtype(modality == "CT" if hu is None else hu, integral, lo, hi), copy=False)


# ----------------------------------------------------------------------------- NIfTI


def check_nifti_bytes(header: Any, path: str) -> None:
    """The first volume's bytes must fit in the file (``.nii``) or in what its gzip data can inflate to.

    Raises:
        DeclaredSizeError: the file cannot hold what the header declares.
    """
    shape = header.get_data_shape()
    first = math.prod(int(n) for n in shape[:3]) * header.get_data_dtype().itemsize
    needed = int(header.get_data_offset()) + first
    size = os.path.getsize(path)
    if path.lower().endswith(".gz"):
        if needed > _DEFLATE_MAX_EXPANSION * size:
            raise DeclaredSizeError(f"{size} bytes of gzip data cannot hold the {needed} bytes declared")
    elif size < needed:
        raise DeclaredSizeError(f"the file holds {size} bytes, the header declares {needed}")


def read_nifti(path: str) -> tuple[np.ndarray, np.ndarray]:
    """Voxel values (x, y, z) with scl_slope/inter applied, and the RAS+ affine; 4D -> first volume.

    Only the fixed-size header is read (:func:`data_prep.streams.read_nifti_header`), then the data
    from ``vox_offset``: header extensions are never read (``nib.load`` would read them whole).
    Values are those of ``nib.load(path).dataobj`` (nibabel's ArrayProxy, same scaling). Truncated
    ``.nii.gz`` files raise (EOFError, zlib.error, ...) only here.
    """
    from nibabel.arrayproxy import ArrayProxy

    header = read_nifti_header(path)
    shape = header.get_data_shape()
    check_nifti_bytes(header, path)
    proxy = ArrayProxy(path, header)
    if len(shape) > 3:
        data = np.asarray(proxy[(slice(None),) * 3 + (0,) * (len(shape) - 3)])
    else:
        data = np.asarray(proxy)
    if data.ndim == 2:
        data = data[:, :, None]
    if data.ndim != 3:
        raise ValueError(f"unsupported NIfTI shape {shape}")
    return data, np.asarray(header.get_best_affine(), dtype=np.float64)
