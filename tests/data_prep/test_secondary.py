"""Issue 9: secondary captures and DERIVED\\SECONDARY images are refused unless their header vouches
BurnedInAnnotation NO or the user opts in; a CT secondary capture is never taken for HU."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from data_prep import Reason
from data_prep.scan import content_reason, scan_file
from tests.data_prep.factory import secondary_capture, volume_series

MPR = ("DERIVED", "SECONDARY", "MPR")


@pytest.mark.parametrize(
    ("image_type", "sc", "burned_in", "allow", "reason"),
    [
        (("ORIGINAL", "PRIMARY"), False, "", False, None),
        (("DERIVED", "PRIMARY"), False, "", False, None),  # derived but primary: a CR processed for display
        (MPR, False, "", False, Reason.SECONDARY_CAPTURE),
        ((), True, "", False, Reason.SECONDARY_CAPTURE),
        ((), True, "NO", False, None),  # the header vouches for its pixels
        ((), True, "no", False, Reason.SECONDARY_CAPTURE),  # exactly NO, nothing else
        ((), True, "", True, None),  # opted in
        (MPR, False, "YES", True, Reason.BURNED_IN_ANNOTATION),  # the opt-in never covers a YES
        (("SECONDARY", "DERIVED"), False, "", False, None),  # value 1 must be DERIVED, value 2 SECONDARY
        (("ORIGINAL", "PRIMARY", "LOCALIZER"), False, "NO", True, Reason.LOCALIZER),
    ],
)
def test_content_rule(image_type, sc: bool, burned_in: str, allow: bool, reason: Reason | None) -> None:
    assert content_reason(image_type, burned_in, secondary_capture=sc, allow_secondary=allow) == reason


def test_scan_refuses_secondary_captures_and_reformats_by_default(tmp_path: Path) -> None:
    sc = secondary_capture(tmp_path / "sc").paths[0]
    vouched = secondary_capture(tmp_path / "vouched", burned_in="NO").paths[0]
    mpr = volume_series(tmp_path / "mpr", n=1, image_type=MPR).paths[0]
    assert scan_file(str(sc), "0/sc").reason == Reason.SECONDARY_CAPTURE
    assert scan_file(str(mpr), "0/mpr").reason == Reason.SECONDARY_CAPTURE
    assert scan_file(str(vouched), "0/v").kind == "dicom"
    assert scan_file(str(sc), "0/sc", allow_secondary=True).kind == "dicom"
    assert scan_file(str(mpr), "0/mpr", allow_secondary=True).kind == "dicom"


def test_ct_secondary_capture_is_raw_but_a_ct_reformat_stays_hu(tmp_path: Path, prep) -> None:
    a = tmp_path / "archive"
    sc = secondary_capture(a / "sc" / "shot")  # Modality CT, but display values 0..255
    mpr = volume_series(a / "mpr", n=3, image_type=MPR, seed=3)  # CT Image Storage: HU
    plain = volume_series(a / "ct", n=3, seed=4)

    default = prep(a)
    assert [default.reason(p) for p in sc.paths + mpr.paths] == [Reason.SECONDARY_CAPTURE.value] * 4
    assert default.row(plain.paths[0]).intensity == "HU"

    run = prep(a, allow_secondary=True)
    shot = run.row(sc.paths[0])
    assert (shot.modality, shot.kind, shot.intensity, shot.dtype) == ("CT", "image", "raw", "uint8")
    np.testing.assert_array_equal(run.array(sc.paths[0]), sc.expected)
    reformat = run.row(mpr.paths[0])
    assert (reformat.modality, reformat.intensity, reformat.dtype) == ("CT", "HU", "int16")
    np.testing.assert_array_equal(run.array(mpr.paths[0]), mpr.expected)
    assert {r.modality_source for r in run.manifest.rows} == {"dicom"}


def test_summary_counts_secondary_captures(tmp_path: Path, prep) -> None:
    a = tmp_path / "archive"
    secondary_capture(a / "one")
    secondary_capture(a / "two", modality="OT")
    run = prep(a)
    assert run.summary.rejects == {"secondary_capture": 2} and "secondary_capture" in run.summary.format()
