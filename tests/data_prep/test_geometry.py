"""Stack ordering and validation tolerances, affines, canonical orientation (pure numpy)."""

from __future__ import annotations

import numpy as np
import pytest

from data_prep.geometry import (
    MISSING_GAP_FACTOR,
    TILT_MAX_PIXELS,
    UNEVEN_FRACTION,
    check_stack,
    slice_normal,
    stack_affine,
    to_canonical,
)
from data_prep.reasons import Reason

AXIAL = (1, 0, 0, 0, 1, 0)
SPACING = (0.5, 0.5)


def _stack(zs, orientation=AXIAL, drift=(0.0, 0.0)):
    n = slice_normal(orientation)
    o = np.asarray(orientation, float)
    return [z * n + k * (drift[0] * o[:3] + drift[1] * o[3:]) for k, z in enumerate(zs)]


def test_orders_by_position_along_the_normal() -> None:
    zs = [4.0, 0.0, 8.0, 2.0, 6.0]
    check = check_stack(_stack(zs), AXIAL, SPACING)
    assert check.reason is None and check.order == (1, 3, 0, 4, 2) and check.spacing == pytest.approx(2.0)


def test_orders_along_an_oblique_normal_not_z() -> None:
    o = (0.0, 0.8, 0.6, 0.0, -0.6, 0.8)  # normal is (1, 0, 0)
    zs = [3.0, 1.0, 2.0]
    pos = [np.array([0.0, 5.0, -3.0]) + z * slice_normal(o) for z in zs]  # sorted by z would be wrong
    assert check_stack(pos, o, SPACING).order == (1, 2, 0)


@pytest.mark.parametrize(
    ("zs", "reason"),
    [
        ([0, 2, 4, 6, 8], None),
        ([0, 2, 2.005, 4], Reason.OVERLAPPING_SLICES),
        ([0, 2, 4, 8, 10], Reason.MISSING_SLICES),  # one slice missing: gap 2x median
        ([0, 2, 4, 6, 6 + 2 * (MISSING_GAP_FACTOR + 0.1), 11.2], Reason.MISSING_SLICES),
        ([0, 2, 4.5, 6, 8], Reason.UNEVEN_SPACING),  # 0.5 mm = 25 % off the grid
        ([0, 2, 4 + 2 * (UNEVEN_FRACTION + 0.02), 6, 8], Reason.UNEVEN_SPACING),
        ([0, 2, 4 + 2 * (UNEVEN_FRACTION - 0.02), 6, 8], None),  # within tolerance
        ([0, 3.0], None),  # two slices: nothing to compare
        ([0], None),
    ],
)
def test_stack_validation(zs, reason) -> None:
    assert check_stack(_stack(zs), AXIAL, SPACING).reason == reason


@pytest.mark.parametrize(("drift_px", "tilted"), [(0.0, False), (0.8 * TILT_MAX_PIXELS, False), (1.5, True)])
def test_gantry_tilt_is_in_plane_drift(drift_px: float, tilted: bool) -> None:
    n = 5  # drift accumulates over the stack: per-slice drift so that the total is drift_px pixels
    per_slice = drift_px * SPACING[0] / (n - 1)
    check = check_stack(_stack([0, 2, 4, 6, 8], drift=(0.0, per_slice)), AXIAL, SPACING)
    assert (check.reason == Reason.GANTRY_TILT) == tilted


def test_stack_affine_columns_follow_dicom_conventions() -> None:
    aff = stack_affine((1.0, 2.0, 3.0), AXIAL, (0.8, 0.7), 2.5)
    np.testing.assert_allclose(aff[:3, 0], [0.7, 0, 0])  # column index i: row cosines x column spacing
    np.testing.assert_allclose(aff[:3, 1], [0, 0.8, 0])  # row index j: column cosines x row spacing
    np.testing.assert_allclose(aff[:3, 2], [0, 0, 2.5])
    np.testing.assert_allclose(aff[:3, 3], [1, 2, 3])


def test_canonical_of_an_axial_stack_is_unchanged() -> None:
    data = np.arange(2 * 3 * 4).reshape(4, 3, 2)  # (i, j, k)
    aff = stack_affine((0, 0, 0), AXIAL, (1.0, 1.0), 2.0)
    arr, new_aff, spacing = to_canonical(data, aff)
    np.testing.assert_array_equal(arr, data.transpose(2, 1, 0))
    np.testing.assert_allclose(new_aff, aff)
    assert spacing == (2.0, 1.0, 1.0)


def test_canonical_of_a_sagittal_stack() -> None:
    # rows run toward -S (feet), columns toward +P, slices toward -L... after reorientation every
    # array axis must increase toward S, P, L and the affine must map indices to the same points.
    o = (0, 1, 0, 0, 0, -1)
    data = np.random.default_rng(0).integers(0, 100, size=(3, 4, 5))  # (i, j, k)
    aff = stack_affine((10, -5, 40), o, (1.5, 1.0), 2.0)
    arr, new_aff, spacing = to_canonical(data, aff)
    assert arr.shape == (4, 3, 5) and spacing == (1.5, 1.0, 2.0)
    for z, y, x in np.ndindex(*arr.shape):  # every voxel keeps its world position and value
        world = new_aff @ [x, y, z, 1]
        i, j, k = np.rint(np.linalg.solve(aff, world)[:3]).astype(int)
        assert arr[z, y, x] == data[i, j, k]
    assert np.all(np.diag(new_aff)[:3] > 0)  # x -> +L, y -> +P, z -> +S
