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
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Any, BinaryIO

#: The most inflated bytes of a deflated DICOM dataset that are not pixel data (the header before the
#: pixel data must also fit in it). Real headers are KB, enhanced multi-frame ones a few MB.
NON_PIXEL_ALLOWANCE = 64 << 20
#: Bytes of a frame's first fragment read by the scan to find its codestream header.
CODESTREAM_HEADER_BYTES = 64 << 10
#: NIfTI header sizes (``sizeof_hdr``) of NIfTI-1 and NIfTI-2.
NIFTI1_HEADER_BYTES = 348
NIFTI2_HEADER_BYTES = 540
#: NIfTI intent codes 3000-3099 are CIFTI matrices (connectivity, parcels, ...), not images.
_CIFTI_INTENTS = range(3000, 3100)

_DEFLATED = "1.2.840.10008.1.2.1.99"
_PIXEL_TAGS = frozenset({0x7FE00010, 0x7FE00008, 0x7FE00009})  # Pixel Data, Float, Double Float
_INFLATE_INPUT = 1 << 16
_ITEM, _SEQUENCE_END = 0xE000FFFE, 0xE0DDFFFE  # as read little endian: group FFFE first


class DeclaredSizeError(ValueError):
    """The bytes present cannot be what the header declares: refused before anything is decoded.

    The message carries byte counts and sizes only (no other header values, no paths), so it may be
    logged. Counted ``pixel_decode_failed`` unless a subclass says otherwise.
    """


class StreamTooLarge(DeclaredSizeError):
    """A deflated dataset inflates past its budget (``too_large``)."""


class SizeMismatch(DeclaredSizeError):
    """A codestream's width, height or components differ from the header's (``size_mismatch``)."""


# ----------------------------------------------------------------------------- deflated DICOM


class _Inflater:
    """Raw deflate (no zlib header, as PS3.5 A.5 and pydicom) inflated a bounded piece at a time."""

    def __init__(self, fp: BinaryIO) -> None:
        self._fp = fp
        self._z = zlib.decompressobj(-zlib.MAX_WBITS)
        self.total = 0  # inflated bytes handed out so far
        self.finished = False

    def read(self, n: int) -> bytes:
        """Up to ``n`` inflated bytes; fewer only at the end of the stream.

        Raises:
            zlib.error: the stream is corrupt or ends early (pydicom fails these files too).
        """
        parts: list[bytes] = []
        got = 0
        while got < n and not self.finished:
            data = self._z.unconsumed_tail or self._fp.read(_INFLATE_INPUT)
            piece = self._z.decompress(data, n - got)
            if piece:
                parts.append(piece)
                got += len(piece)
            if self._z.eof:
                self.finished = True
            elif not data and not piece:
                raise zlib.error("truncated deflate stream")
        self.total += got
        return b"".join(parts)

    def skip(self, n: int) -> None:
        """Inflate and discard up to ``n`` bytes (memory: one piece at a time)."""
        while n > 0 and not self.finished:
            n -= len(self.read(min(n, 1 << 20)))

    def extend(self, out: bytearray, n: int) -> None:
        """Append up to ``n`` inflated bytes to ``out``, 1 MiB at a time (no second copy of the whole)."""
        while n > 0 and not self.finished:
            piece = self.read(min(n, 1 << 20))
            out += piece
            n -= len(piece)


class _View:
    """``read``/``seek``/``tell`` over a bytearray without copying it: pydicom parses the inflated
    dataset from it (``io.BytesIO`` would copy the bytearray first)."""

    def __init__(self, data: bytearray) -> None:
        self._data = data
        self._pos = 0

    def read(self, n: int | None = -1) -> bytes:
        end = len(self._data) if n is None or n < 0 else min(len(self._data), self._pos + n)
        with memoryview(self._data) as view:
            out = bytes(view[self._pos : end]) if end > self._pos else b""
        self._pos = max(self._pos, end)
        return out

    def seek(self, offset: int, whence: int = 0) -> int:
        base = (0, self._pos, len(self._data))[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def close(self) -> None:
        self._data = bytearray()


@dataclass
class DicomRead:
    """A dataset and where it was read from.

    ``size`` is the number of bytes of the stream the dataset's offsets refer to (the file, or the
    inflated dataset of a deflated file); ``pixel_tell`` is where the pixel data element starts in
    ``stream`` for a header-only read that reached it (None otherwise).
    """

    ds: Any
    stream: BinaryIO
    size: int
    pixel_tell: int | None
    deflated: bool


def _int_of(v: Any) -> int:
    try:
        x = float(v.value if hasattr(v, "value") and not isinstance(v, str | bytes | int | float) else v)
    except (TypeError, ValueError, IndexError):
        return 0
    return int(x) if math.isfinite(x) and x > 0 and x.is_integer() else 0


def declared_voxels(ds: Any) -> int:
    """Rows x Columns x NumberOfFrames (1 when absent) as the header says; 0 when unusable."""
    return _int_of(ds.get("Rows")) * _int_of(ds.get("Columns")) * (_int_of(ds.get("NumberOfFrames")) or 1)


def declared_pixel_bytes(ds: Any) -> int:
    """The pixel bytes a header declares: voxels x samples per pixel x bytes per sample."""
    bits = _int_of(ds.get("BitsAllocated")) or 16
    return declared_voxels(ds) * (_int_of(ds.get("SamplesPerPixel")) or 1) * max(1, (bits + 7) // 8)


def read_dicom(
    fp: BinaryIO, *, force: bool, header_only: bool, defer_size: str | int | None = None,
    max_voxels: int | None = None,
) -> DicomRead:
    """Read a DICOM dataset from an open binary file, inflating deflated ones under a budget.

    ``header_only`` stops before the pixel data (``dcmread(stop_before_pixels=True)``) and leaves
    ``stream`` at the pixel data element; a deflated stream is still inflated (and discarded) up to
    its budget, so an oversized one is refused by the scan already. A header declaring more than
    ``max_voxels`` is not counted (the header check refuses it). Other syntaxes are read as
    ``dcmread`` reads them.

    Raises:
        StreamTooLarge: a deflated dataset inflates past its budget.
    """
    from pydicom.filereader import _read_file_meta_info, read_partial, read_preamble

    start = fp.tell()
    if _may_be_deflated(fp):
        preamble = read_preamble(fp, force)
        meta = _read_file_meta_info(fp)
        if str(meta.get("TransferSyntaxUID", "")).strip("\0 ") == _DEFLATED:
            return _read_deflated(fp, preamble, meta, header_only=header_only, max_voxels=max_voxels)
        fp.seek(start)
    reached: list[bool] = []
    ds = read_partial(fp, _stop_at_pixels(reached) if header_only else None, defer_size=defer_size, force=force)
    pixel_tell = fp.tell() if reached else None
    fp.seek(0, 2)
    return DicomRead(ds, fp, fp.tell(), pixel_tell, deflated=False)


def _may_be_deflated(fp: BinaryIO) -> bool:
    """False when the file meta (found through its group length) surely does not name the deflated
    syntax: the common case costs one small read instead of a second parse of the meta."""
    start = fp.tell()
    head = fp.read(144)
    try:
        if len(head) < 144 or head[128:132] != b"DICM" or head[132:140] != b"\x02\x00\x00\x00UL\x04\x00":
            return True  # no part-10 layout with a group length: let pydicom read the meta
        length = int.from_bytes(head[140:144], "little")
        return length > 1 << 20 or _DEFLATED.encode() in fp.read(length)
    finally:
        fp.seek(start)


def _stop_at_pixels(reached: list[bool]) -> Any:
    def stop(tag: Any, vr: Any, length: Any) -> bool:
        if int(tag) in _PIXEL_TAGS:
            reached.append(True)
            return True
        return False

    return stop


def _parse_inflated(data: bytearray, preamble: Any, meta: Any, *, header_only: bool) -> tuple[Any, Any, int | None]:
    """``(dataset, stream, pixel_tell)`` of an inflated (explicit VR little endian) dataset, as read_partial.

    A header-only parse defers values over 1 MiB (read from ``stream`` if ever accessed), so a large
    element before the pixel data is not copied again.
    """
    from pydicom.dataset import FileDataset
    from pydicom.filereader import read_dataset

    buf = _View(data)
    reached: list[bool] = []
    dataset = read_dataset(buf, False, True, stop_when=_stop_at_pixels(reached) if header_only else None,
                           defer_size=1 << 20 if header_only else None)
    pixel_tell = buf.tell() if reached else None
    ds = FileDataset(buf, dataset, preamble, meta, False, True)
    ds.set_original_encoding(False, True, dataset._character_set)
    return ds, buf, pixel_tell


def _read_deflated(fp: BinaryIO, preamble: Any, meta: Any, *, header_only: bool, max_voxels: int | None) -> DicomRead:
    inflater = _Inflater(fp)
    data = bytearray()
    target = 64 << 10
    while True:  # inflate until the pixel data element (or the end) is in memory, re-parsing as it grows
        inflater.extend(data, target - len(data))
        error: Exception | None = None
        try:
            ds, buf, pixel_tell = _parse_inflated(data, preamble, meta, header_only=True)
        except Exception as e:
            if inflater.finished:
                raise
            error, pixel_tell = e, None  # cut inside an element pydicom cannot skip: inflate more
        if pixel_tell is not None or inflater.finished:
            break
        if len(data) >= NON_PIXEL_ALLOWANCE:
            if error is not None:  # not cut short: a header that does not parse (dicom_unreadable)
                raise error
            raise StreamTooLarge(f"no pixel data in the first {NON_PIXEL_ALLOWANCE} inflated bytes")
        target = min(4 * target, NON_PIXEL_ALLOWANCE)
    voxels = declared_voxels(ds)
    budget = declared_pixel_bytes(ds) + NON_PIXEL_ALLOWANCE
    if header_only:
        if max_voxels is None or voxels <= max_voxels:
            inflater.skip(budget + 1 - inflater.total)
            if inflater.total > budget:
                raise StreamTooLarge(f"the deflated dataset inflates past {budget} bytes "
                                     f"({NON_PIXEL_ALLOWANCE} more than the pixel bytes declared)")
        return DicomRead(ds, buf, len(data), pixel_tell, deflated=True)
    inflater.extend(data, budget + 1 - inflater.total)
    if inflater.total > budget:
        raise StreamTooLarge(f"the deflated dataset inflates past {budget} bytes "
                             f"({NON_PIXEL_ALLOWANCE} more than the pixel bytes declared)")
    ds, buf, _ = _parse_inflated(data, preamble, meta, header_only=False)
    size = len(data)
    buf.close()  # nothing is deferred: the values are in ``ds``; the inflated bytes can go
    return DicomRead(ds, buf, size, None, deflated=True)


# ----------------------------------------------------------------------------- codestreams


#: Transfer syntaxes whose frames are JPEG (SOFn), JPEG-LS (SOF55) or JPEG 2000 / HTJ2K (SIZ) codestreams.
JPEG_SYNTAXES = frozenset({"1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.57",
                           "1.2.840.10008.1.2.4.70"})
JPEG_LS_SYNTAXES = frozenset({"1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81"})
JPEG_2000_SYNTAXES = frozenset({"1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.92",
                                "1.2.840.10008.1.2.4.93", "1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.4.202",
                                "1.2.840.10008.1.2.4.203"})
CODESTREAM_SYNTAXES = JPEG_SYNTAXES | JPEG_LS_SYNTAXES | JPEG_2000_SYNTAXES

# SOF0..SOF15 without DHT (C4), JPG (C8), DAC (CC); SOF55 (F7) is JPEG-LS
_SOF_MARKERS = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xF7})
_JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  \r\n\x87\n"


def codestream_kind(syntax: str) -> str | None:
    """``"JPEG"``, ``"JPEG-LS"``, ``"JPEG 2000"`` for a syntax whose frames are such codestreams, else None."""
    syntax = str(syntax)
    if syntax in JPEG_2000_SYNTAXES:
        return "JPEG 2000"
    if syntax in JPEG_LS_SYNTAXES:
        return "JPEG-LS"
    if syntax in JPEG_SYNTAXES:
        return "JPEG"
    return None


def codestream_size(data: bytes) -> tuple[int, int, int] | None:
    """``(width, height, components)`` a JPEG / JPEG-LS / JPEG 2000 (raw or JP2) codestream declares.

    None when no such header is found in ``data`` (not a codestream, or cut before its size). A JPEG
    height of 0 (defined later by a DNL marker) comes back as 0. A JPEG 2000 image with subsampled
    components or an image offset larger than its extent comes back as (0, 0, components).
    """
    if data[:2] == b"\xff\xd8":
        return _jpeg_size(data)
    if data[:4] == b"\xff\x4f\xff\x51":
        return _siz_size(data, 2)
    if data[:12] == _JP2_SIGNATURE:
        return _jp2_size(data)
    return None


def _jpeg_size(b: bytes) -> tuple[int, int, int] | None:
    i = 2
    while i + 4 <= len(b):
        if b[i] != 0xFF:
            return None
        m = b[i + 1]
        if m == 0xFF:  # fill byte
            i += 1
            continue
        if m == 0x01 or 0xD0 <= m <= 0xD7:  # TEM, RSTn: no length
            i += 2
            continue
        if m in (0xD8, 0xD9, 0xDA):  # SOI, EOI or start of scan before any frame header
            return None
        length = int.from_bytes(b[i + 2 : i + 4], "big")
        if length < 2:
            return None
        if m in _SOF_MARKERS:
            if i + 10 > len(b) or length < 8:
                return None
            height = int.from_bytes(b[i + 5 : i + 7], "big")
            width = int.from_bytes(b[i + 7 : i + 9], "big")
            return width, height, b[i + 9]
        i += 2 + length
    return None


def _siz_size(b: bytes, at: int) -> tuple[int, int, int] | None:
    """The SIZ marker segment starting at ``b[at]`` (its FF51, right after SOC)."""
    if len(b) < at + 40:
        return None
    u32 = [int.from_bytes(b[at + 6 + 4 * k : at + 10 + 4 * k], "big") for k in range(8)]
    xsiz, ysiz, xosiz, yosiz = u32[:4]
    components = int.from_bytes(b[at + 38 : at + 40], "big")
    for c in range(components):  # each component: Ssiz, XRsiz, YRsiz
        k = at + 40 + 3 * c
        if k + 3 > len(b):
            break
        if b[k + 1] != 1 or b[k + 2] != 1:
            return 0, 0, components
    if xosiz >= xsiz or yosiz >= ysiz:
        return 0, 0, components
    return xsiz - xosiz, ysiz - yosiz, components


def _jp2_size(b: bytes) -> tuple[int, int, int] | None:
    """Walk the JP2 boxes to the contiguous codestream box (``jp2c``)."""
    i = 0
    while i + 8 <= len(b):
        length = int.from_bytes(b[i : i + 4], "big")
        kind = b[i + 4 : i + 8]
        header = 8
        if length == 1:
            if i + 16 > len(b):
                return None
            length, header = int.from_bytes(b[i + 8 : i + 16], "big"), 16
        elif length == 0:
            length = len(b) - i
        if length < header:
            return None
        if kind == b"jp2c":
            body = b[i + header : i + length]
            return _siz_size(body, 2) if body[:4] == b"\xff\x4f\xff\x51" else None
        i += length
    return None


def check_codestream(kind: str, size: tuple[int, int, int] | None, rows: int, columns: int, samples: int,
                     frame: int = 0) -> None:
    """Raise unless a frame's codestream declares exactly ``columns x rows x samples``.

    Raises:
        SizeMismatch: it declares another size.
        DeclaredSizeError: it has no readable header (no decoder is given such a frame).
    """
    if size is None:
        raise DeclaredSizeError(f"frame {frame}: no {kind} codestream header")
    width, height, components = size
    if (width, height, components) != (columns, rows, samples):
        raise SizeMismatch(f"frame {frame}: the {kind} codestream is {width} x {height} x {components}, "
                           f"the header says {columns} x {rows} x {samples}")


def first_codestream_size(fp: BinaryIO, pixel_tell: int) -> tuple[int, int, int] | None:
    """The size the first fragment of encapsulated pixel data declares (file at ``pixel_tell``).

    Reads the element header, the Basic Offset Table item header and at most
    :data:`CODESTREAM_HEADER_BYTES` of the first fragment. None when the layout is not encapsulated
    pixel data with a readable codestream header (the build refuses such frames before decoding).
    """
    fp.seek(pixel_tell)
    head = fp.read(12)
    if len(head) < 12 or head[8:12] != b"\xff\xff\xff\xff":  # not undefined length: not encapsulated
        return None
    lengths = []
    for _item in ("basic offset table", "first fragment"):
        item = fp.read(8)
        if len(item) < 8 or int.from_bytes(item[:4], "little") != _ITEM:
            return None
        lengths.append(int.from_bytes(item[4:8], "little"))
        if len(lengths) == 1:
            fp.seek(lengths[0], 1)
    return codestream_size(fp.read(min(lengths[1], CODESTREAM_HEADER_BYTES)))


def check_codestreams(ds: Any, rows: int, columns: int, n_frames: int) -> None:
    """Check every frame's codestream against Rows x Columns (x SamplesPerPixel) before decoding.

    Frames are split exactly as pydicom's decoders split them (``generate_frames``, with the
    Extended Offset Table when there is one). Does nothing for other transfer syntaxes.

    Raises:
        SizeMismatch: a frame's codestream declares another size.
        DeclaredSizeError: a frame has no readable codestream header.
    """
    kind = codestream_kind(ds.file_meta.get("TransferSyntaxUID", ""))
    if kind is None or "PixelData" not in ds:
        return
    from pydicom.encaps import generate_fragmented_frames

    extended = None
    if "ExtendedOffsetTable" in ds and "ExtendedOffsetTableLengths" in ds:
        extended = (ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths)
    samples = _int_of(ds.get("SamplesPerPixel")) or 1
    for index, fragments in enumerate(
        generate_fragmented_frames(ds.PixelData, number_of_frames=n_frames, extended_offsets=extended)
    ):
        head = b""
        for fragment in fragments:  # enough of the frame's start for its header
            head += fragment[: CODESTREAM_HEADER_BYTES - len(head)]
            if len(head) >= CODESTREAM_HEADER_BYTES:
                break
        size = codestream_size(head)
        if size is None and len(head) >= CODESTREAM_HEADER_BYTES:  # large segments or boxes first: the whole frame
            size = codestream_size(b"".join(fragments))
        check_codestream(kind, size, rows, columns, samples, index)


# ----------------------------------------------------------------------------- NIfTI


def read_nifti_header(path: str) -> Any:
    """A NIfTI-1 or NIfTI-2 header read from its fixed-size block only (never its extensions).

    The file is opened as nibabel opens it (``ImageOpener``: ``.gz`` by name), so of a ``.nii.gz``
    only the first 540 bytes are inflated. Returns a nibabel ``Nifti1Header`` / ``Nifti2Header``
    built from those bytes, checked as ``nib.load`` checks it, with no extensions.

    Raises:
        ValueError: not a NIfTI-1/2 header, or one nibabel refuses (its ``HeaderDataError`` is a ValueError).
    """
    import nibabel as nib
    from nibabel.openers import ImageOpener

    with ImageOpener(path) as f:  # the opener nibabel's array proxy reads the voxels with
        block = f.read(NIFTI2_HEADER_BYTES)
    for klass in (nib.Nifti1Header, nib.Nifti2Header):
        if klass.may_contain_header(block):
            return klass(block[: klass.sizeof_hdr], check=True)
    raise ValueError(f"not a NIfTI header (sizeof_hdr is neither {NIFTI1_HEADER_BYTES} nor {NIFTI2_HEADER_BYTES})")


def is_cifti(header: Any) -> bool:
    """A CIFTI matrix (intent codes 3000-3099), not an image."""
    return int(header["intent_code"]) in _CIFTI_INTENTS
