"""Compact scan records (issue 20): repeated header values are shared, and nothing changes value."""

from __future__ import annotations

import math
import struct
from pathlib import Path

from data_prep.compact import Compactor
from data_prep.headers import DicomHeader, FrameInfo
from data_prep.scan import ScanRecord, scan_archives, scan_file
from tests.data_prep.factory import volume_series


def _bits(x: float) -> bytes:
    return struct.pack("<d", x)


def test_interning_is_exact_signed_zero_nan_and_int_float_stay_apart() -> None:
    c = Compactor()
    zero, minus_zero = c.value(0.0), c.value(-0.0)
    assert _bits(zero) == _bits(0.0) and _bits(minus_zero) == _bits(-0.0)
    assert c.value((1.0, -0.0)) == (1.0, -0.0) and _bits(c.value((1.0, -0.0))[1]) == _bits(-0.0)
    assert _bits(c.value((1.0, 0.0))[1]) == _bits(0.0)
    assert type(c.value(1)) is int and type(c.value(1.0)) is float
    assert math.isnan(c.value(float("nan")))
    a, b = c.value("".join(["CT", "x"])), c.value("".join(["C", "Tx"]))
    assert a is b
    t1, t2 = c.value((0.5, 0.25)), c.value((float("0.5"), float("0.25")))
    assert t1 is t2 and t1[0] is c.value(0.5)


def test_records_share_their_repeated_values_and_compare_equal(tmp_path: Path) -> None:
    s = volume_series(tmp_path, n=4)
    records = [scan_file(str(p), f"0/{i}") for i, p in enumerate(s.paths)]
    c = Compactor()
    compact = [c.record(r) for r in records]
    assert compact == records  # every value unchanged
    assert [repr(r) for r in compact] == [repr(r) for r in records]
    h0, h1 = compact[0].dicom, compact[1].dicom
    assert isinstance(h0, DicomHeader) and isinstance(h1, DicomHeader)
    assert h0.series_uid is h1.series_uid and h0.patient_key is h1.patient_key
    f0, f1 = h0.frames[0], h1.frames[0]
    assert isinstance(f0, FrameInfo) and f0.orientation is f1.orientation and f0.split is f1.split
    assert f0.pixel_spacing is f1.pixel_spacing and f0.intercept is f1.intercept
    assert f0.position is not None and f1.position is not None and f0.position[0] is f1.position[0]


def test_a_full_table_is_cleared_between_records_and_values_still_match(tmp_path: Path) -> None:
    s = volume_series(tmp_path, n=5)
    records = [scan_file(str(p), f"0/{i}") for i, p in enumerate(s.paths)]
    c = Compactor(limit=3)
    assert [c.record(r) for r in records] == records


def test_records_without_a_header_pass_through() -> None:
    r = ScanRecord("0/x", "/x", "reject")
    assert Compactor().record(r) is r


def test_scan_archives_returns_the_same_records_as_scanning_each_file(tmp_path: Path) -> None:
    volume_series(tmp_path / "a", n=3)
    volume_series(tmp_path / "b", n=2)
    got = scan_archives([tmp_path])
    assert got == sorted((scan_file(r.path, r.rel) for r in got), key=lambda r: r.rel)
