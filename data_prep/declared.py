"""What a DICOM header declares about its pixel bytes, and the errors raised when the stream disagrees.

Shared by the deflate reader (:mod:`data_prep.deflated`) and the codestream checks
(:mod:`data_prep.codestreams`). Exception messages carry sizes only (never paths or other header
values), so they may be logged.
"""

from __future__ import annotations

import math
from typing import Any


class DeclaredSizeError(ValueError):
    """The bytes present cannot be what the header declares: refused before anything is decoded.

    The message carries byte counts and sizes only (no other header values, no paths), so it may be
    logged. Counted ``pixel_decode_failed`` unless a subclass says otherwise.
    """


class StreamTooLarge(DeclaredSizeError):
    """A deflated dataset inflates past its budget (``too_large``)."""


class SizeMismatch(DeclaredSizeError):
    """A codestream's width, height or components differ from the header's (``size_mismatch``)."""


def declared_int(v: Any) -> int:
    """A header value as a positive whole number; 0 when absent, not a number, not whole or not positive."""
    try:
        x = float(v.value if hasattr(v, "value") and not isinstance(v, str | bytes | int | float) else v)
    except (TypeError, ValueError, IndexError):
        return 0
    return int(x) if math.isfinite(x) and x > 0 and x.is_integer() else 0


def declared_voxels(ds: Any) -> int:
    """Rows x Columns x NumberOfFrames (1 when absent) as the header says; 0 when unusable."""
    return (
        declared_int(ds.get("Rows")) * declared_int(ds.get("Columns")) * (declared_int(ds.get("NumberOfFrames")) or 1)
    )


def declared_pixel_bytes(ds: Any) -> int:
    """The pixel bytes a header declares: voxels x samples per pixel x bytes per sample."""
    bits = declared_int(ds.get("BitsAllocated")) or 16
    return declared_voxels(ds) * (declared_int(ds.get("SamplesPerPixel")) or 1) * max(1, (bits + 7) // 8)
