"""Sizes from the stream that will be decoded, read before anything is decoded.

A header's Rows x Columns x frames is what ``--max-voxels`` checks, but decoders size their buffers
from the bytes they are given, and a hostile file can make those bytes say something else. This module
reads what the decoded stream itself says, in bounded memory, before any decoder runs
(docs/data_prep.md, "Guarantees"):

* **Deflated DICOM** (Deflated Explicit VR Little Endian): pydicom inflates the whole stream in
  ``dcmread``, header-only reads included, so a few MB can become gigabytes. :func:`read_dicom`
  inflates it itself, incrementally (``zlib`` ``decompressobj`` with ``max_length``), under a byte
  budget: the pixel data must start within :data:`NON_PIXEL_ALLOWANCE` inflated bytes, and the whole
  dataset may inflate to at most the pixel bytes its header declares (Rows x Columns x frames x
  samples x bytes per sample, itself bounded by ``--max-voxels``) plus that allowance. Past the
  budget it raises :class:`StreamTooLarge` (``too_large``). pydicom then reads the inflated bytes
  from memory.
* **JPEG, JPEG-LS, JPEG 2000 codestreams** of encapsulated pixel data: the SOFn / SOF55 / SIZ marker
  gives the width, height and components the decoder will allocate; a frame whose codestream
  disagrees with Rows, Columns and SamplesPerPixel raises :class:`SizeMismatch` (``size_mismatch``).
  The scan checks the first frame (:func:`first_codestream_size`), the build every frame before
  decoding (:func:`check_codestreams`); a frame without a readable codestream header is never handed
  to a decoder (:class:`DeclaredSizeError`, ``pixel_decode_failed``).
* **NIfTI**: only the fixed header (348 bytes, NIfTI-2: 540) is read (:func:`read_nifti_header`);
  header extensions, which ``nib.load`` reads whole (a ``.nii.gz`` can claim gigabytes of them), are
  never read: the data is read from ``vox_offset``.

Exception messages carry sizes only (never paths or other header values), so they may be logged.

One module per stream: :mod:`data_prep.deflated`, :mod:`data_prep.codestreams`,
:mod:`data_prep.nifti_header`, with the errors and declared sizes they share in
:mod:`data_prep.declared`. Every public name is importable from here.
"""

from data_prep.codestreams import (
    CODESTREAM_HEADER_BYTES,
    CODESTREAM_SYNTAXES,
    JPEG_2000_SYNTAXES,
    JPEG_LS_SYNTAXES,
    JPEG_SYNTAXES,
    check_codestream,
    check_codestreams,
    codestream_kind,
    codestream_size,
    first_codestream_size,
)
from data_prep.declared import (
    DeclaredSizeError,
    SizeMismatch,
    StreamTooLarge,
    declared_pixel_bytes,
    declared_voxels,
)
from data_prep.deflated import NON_PIXEL_ALLOWANCE, DicomRead, read_dicom
from data_prep.nifti_header import NIFTI1_HEADER_BYTES, NIFTI2_HEADER_BYTES, is_cifti, read_nifti_header

__all__ = [
    "CODESTREAM_HEADER_BYTES",
    "CODESTREAM_SYNTAXES",
    "JPEG_2000_SYNTAXES",
    "JPEG_LS_SYNTAXES",
    "JPEG_SYNTAXES",
    "NIFTI1_HEADER_BYTES",
    "NIFTI2_HEADER_BYTES",
    "NON_PIXEL_ALLOWANCE",
    "DeclaredSizeError",
    "DicomRead",
    "SizeMismatch",
    "StreamTooLarge",
    "check_codestream",
    "check_codestreams",
    "codestream_kind",
    "codestream_size",
    "declared_pixel_bytes",
    "declared_voxels",
    "first_codestream_size",
    "is_cifti",
    "read_dicom",
    "read_nifti_header",
]
