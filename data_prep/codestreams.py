"""Sizes that JPEG, JPEG-LS and JPEG 2000 codestreams declare, checked against the header before decoding.

The SOFn / SOF55 / SIZ marker of encapsulated pixel data gives the width, height and components the
decoder will allocate; a frame whose codestream disagrees with Rows, Columns and SamplesPerPixel
raises :class:`~data_prep.declared.SizeMismatch` (``size_mismatch``). The scan checks the first
frame (:func:`first_codestream_size`), the build every frame before decoding
(:func:`check_codestreams`); a frame without a readable codestream header is never handed to a
decoder (:class:`~data_prep.declared.DeclaredSizeError`, ``pixel_decode_failed``).
"""

from __future__ import annotations

from typing import Any, BinaryIO

from data_prep.declared import DeclaredSizeError, SizeMismatch, declared_int

#: Bytes of a frame's first fragment read by the scan to find its codestream header.
CODESTREAM_HEADER_BYTES = 64 << 10
_ITEM, _SEQUENCE_END = 0xE000FFFE, 0xE0DDFFFE  # as read little endian: group FFFE first

#: Transfer syntaxes whose frames are JPEG (SOFn), JPEG-LS (SOF55) or JPEG 2000 / HTJ2K (SIZ) codestreams.
JPEG_SYNTAXES = frozenset(
    {"1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70"}
)
JPEG_LS_SYNTAXES = frozenset({"1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81"})
JPEG_2000_SYNTAXES = frozenset(
    {
        "1.2.840.10008.1.2.4.90",
        "1.2.840.10008.1.2.4.91",
        "1.2.840.10008.1.2.4.92",
        "1.2.840.10008.1.2.4.93",
        "1.2.840.10008.1.2.4.201",
        "1.2.840.10008.1.2.4.202",
        "1.2.840.10008.1.2.4.203",
    }
)
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


def check_codestream(
    kind: str, size: tuple[int, int, int] | None, rows: int, columns: int, samples: int, frame: int = 0
) -> None:
    """Raise unless a frame's codestream declares exactly ``columns x rows x samples``.

    Raises:
        SizeMismatch: it declares another size.
        DeclaredSizeError: it has no readable header (no decoder is given such a frame).
    """
    if size is None:
        raise DeclaredSizeError(f"frame {frame}: no {kind} codestream header")
    width, height, components = size
    if (width, height, components) != (columns, rows, samples):
        raise SizeMismatch(
            f"frame {frame}: the {kind} codestream is {width} x {height} x {components}, "
            f"the header says {columns} x {rows} x {samples}"
        )


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
    samples = declared_int(ds.get("SamplesPerPixel")) or 1
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
