"""Read a DICOM dataset, inflating a deflated one incrementally under a byte budget.

pydicom inflates a whole Deflated Explicit VR Little Endian stream in ``dcmread``, header-only reads
included, so a few MB can become gigabytes. :func:`read_dicom` inflates it itself (``zlib``
``decompressobj`` with ``max_length``): the pixel data must start within :data:`NON_PIXEL_ALLOWANCE`
inflated bytes, and the whole dataset may inflate to at most the pixel bytes its header declares
plus that allowance; past the budget it raises :class:`~data_prep.declared.StreamTooLarge`.
pydicom then reads the inflated bytes from memory. Other syntaxes are read as ``dcmread`` reads them.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any, BinaryIO

from data_prep.declared import StreamTooLarge, declared_pixel_bytes, declared_voxels

#: The most inflated bytes of a deflated DICOM dataset that are not pixel data (the header before the
#: pixel data must also fit in it). Real headers are KB, enhanced multi-frame ones a few MB.
NON_PIXEL_ALLOWANCE = 64 << 20

_DEFLATED = "1.2.840.10008.1.2.1.99"
_PIXEL_TAGS = frozenset({0x7FE00010, 0x7FE00008, 0x7FE00009})  # Pixel Data, Float, Double Float
_INFLATE_INPUT = 1 << 16


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


def read_dicom(
    fp: BinaryIO,
    *,
    force: bool,
    header_only: bool,
    defer_size: str | int | None = None,
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
    dataset = read_dataset(
        buf,
        False,
        True,
        stop_when=_stop_at_pixels(reached) if header_only else None,
        defer_size=1 << 20 if header_only else None,
    )
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
                raise StreamTooLarge(
                    f"the deflated dataset inflates past {budget} bytes "
                    f"({NON_PIXEL_ALLOWANCE} more than the pixel bytes declared)"
                )
        return DicomRead(ds, buf, len(data), pixel_tell, deflated=True)
    inflater.extend(data, budget + 1 - inflater.total)
    if inflater.total > budget:
        raise StreamTooLarge(
            f"the deflated dataset inflates past {budget} bytes "
            f"({NON_PIXEL_ALLOWANCE} more than the pixel bytes declared)"
        )
    ds, buf, _ = _parse_inflated(data, preamble, meta, header_only=False)
    size = len(data)
    buf.close()  # nothing is deferred: the values are in ``ds``; the inflated bytes can go
    return DicomRead(ds, buf, size, None, deflated=True)
