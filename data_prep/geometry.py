"""Slice-stack geometry: ordering, validation, affines and the canonical orientation (pure numpy).

Conventions (DICOM LPS): ``orientation`` is ImageOrientationPatient ``(row cosines, column cosines)``
— the direction of increasing column index, then of increasing row index; the slice normal is
their cross product. Slices are ordered by their position projected on that normal, never by
InstanceNumber. Tolerances are module constants so docs and tests can quote them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from nibabel.orientations import apply_orientation, inv_ornt_aff, io_orientation, ornt_transform

from data_prep.reasons import Reason

#: Two slices closer than this along the normal occupy the same place (mm).
OVERLAP_MM = 0.01
#: A gap larger than this multiple of the median gap means slices are missing.
MISSING_GAP_FACTOR = 1.5
#: A slice may lie at most this fraction of the slice spacing off the uniform grid ...
UNEVEN_FRACTION = 0.10
#: ... or this many mm, whichever is larger (absorbs positions written with few decimals).
UNEVEN_MIN_MM = 0.02
#: In-plane drift of the slice positions, in pixels, beyond which the stack is tilted/sheared.
TILT_MAX_PIXELS = 0.5
#: Cosines are rounded to this many decimals before orientations are compared (split key).
ORIENTATION_DECIMALS = 4
#: Pixel spacings are rounded to this many decimals (mm) before they are compared (split key).
SPACING_DECIMALS = 4

#: Target of the canonical orientation: voxel x -> +L, y -> +P, z -> +S (DICOM LPS world axes).
_CANONICAL = np.array([[0, 1], [1, 1], [2, 1]], dtype=float)


@dataclass(frozen=True)
class StackCheck:
    """Result of :func:`check_stack`: slice order (indices into the input) and the spacing, or a reason."""

    order: tuple[int, ...]
    spacing: float | None
    reason: Reason | None


def slice_normal(orientation: Sequence[float]) -> np.ndarray:
    """Unit normal of the slice plane: row cosines x column cosines."""
    o = np.asarray(orientation, dtype=float)
    n = np.cross(o[:3], o[3:])
    norm = np.linalg.norm(n)
    if not norm > 1e-6:
        raise ValueError("degenerate ImageOrientationPatient")
    return n / norm


def valid_orientation(orientation: Sequence[float] | None) -> bool:
    """Row and column cosines present, of unit length and orthogonal (loosely: rounding happens)."""
    if orientation is None:
        return False
    o = np.asarray(orientation, dtype=float)
    r, c = o[:3], o[3:]
    return bool(abs(np.linalg.norm(r) - 1) < 0.01 and abs(np.linalg.norm(c) - 1) < 0.01 and abs(r @ c) < 0.01)


def orientation_key(orientation: Sequence[float]) -> tuple[float, ...]:
    """Rounded cosines (with -0.0 folded to 0.0) for grouping slices of one plane."""
    return tuple(float(round(v, ORIENTATION_DECIMALS)) + 0.0 for v in orientation)


def spacing_key(spacing: Sequence[float]) -> tuple[float, ...]:
    return tuple(float(round(v, SPACING_DECIMALS)) + 0.0 for v in spacing)


def check_stack(
    positions: Sequence[Sequence[float]],
    orientation: Sequence[float],
    pixel_spacing: Sequence[float],
) -> StackCheck:
    """Order slices along the normal and validate the stack.

    Checks, in order: overlapping positions, gantry tilt (in-plane drift > ``TILT_MAX_PIXELS``),
    missing slices (a gap > ``MISSING_GAP_FACTOR`` x median gap, 3+ slices), uneven spacing (a slice
    more than ``max(UNEVEN_FRACTION * spacing, UNEVEN_MIN_MM)`` off the uniform grid, 3+ slices).
    Ties in position are broken by input index so the order is deterministic.
    """
    p = np.asarray(positions, dtype=float).reshape(-1, 3)
    n = slice_normal(orientation)
    z = p @ n
    order = tuple(int(i) for i in np.lexsort((np.arange(len(z)), z)))
    if len(order) == 1:
        return StackCheck(order, None, None)
    zs = z[list(order)]
    gaps = np.diff(zs)
    if gaps.min() < OVERLAP_MM:
        return StackCheck(order, None, Reason.OVERLAPPING_SLICES)
    rel = p[list(order)] - p[order[0]]
    in_plane = rel - np.outer(rel @ n, n)
    if np.linalg.norm(in_plane, axis=1).max() > TILT_MAX_PIXELS * min(pixel_spacing):
        return StackCheck(order, None, Reason.GANTRY_TILT)
    step = (zs[-1] - zs[0]) / (len(zs) - 1)
    if len(zs) >= 3:
        if gaps.max() > MISSING_GAP_FACTOR * float(np.median(gaps)):
            return StackCheck(order, None, Reason.MISSING_SLICES)
        grid = zs[0] + step * np.arange(len(zs))
        if np.abs(zs - grid).max() > max(UNEVEN_FRACTION * step, UNEVEN_MIN_MM):
            return StackCheck(order, None, Reason.UNEVEN_SPACING)
    return StackCheck(order, float(step), None)


def stack_affine(
    first_position: Sequence[float],
    orientation: Sequence[float],
    pixel_spacing: Sequence[float],
    slice_spacing: float,
) -> np.ndarray:
    """Affine of a native stack: voxel (column i, row j, slice k, 1) -> LPS mm.

    ``pixel_spacing`` is DICOM's (row spacing, column spacing); slice k sits ``k * slice_spacing``
    along the normal from the first (lowest) slice.
    """
    o = np.asarray(orientation, dtype=float)
    aff = np.eye(4)
    aff[:3, 0] = o[:3] * float(pixel_spacing[1])
    aff[:3, 1] = o[3:] * float(pixel_spacing[0])
    aff[:3, 2] = slice_normal(o) * float(slice_spacing)
    aff[:3, 3] = np.asarray(first_position, dtype=float)
    return aff


def to_canonical(data_ijk: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    """Reorient a 3D array indexed (x, y, z) = (i, j, k) with an LPS affine to the cache's canonical form.

    Returns ``(array_zyx, affine_xyz, spacing_zyx)``: the array axes (Z, Y, X) are the voxel axes closest
    to (superior, posterior, left), each increasing that way; the affine maps the new (x, y, z, 1) to LPS.
    Only flips and axis swaps happen (no resampling), so the result is usually a view.
    """
    if data_ijk.ndim != 3:
        raise ValueError(f"expected a 3D array, got shape {data_ijk.shape}")
    ornt = io_orientation(affine)
    if not np.isfinite(ornt).all():
        raise ValueError("affine has a degenerate axis")
    transform = ornt_transform(ornt, _CANONICAL)
    data = apply_orientation(data_ijk, transform)
    new_affine = affine @ inv_ornt_aff(transform, data_ijk.shape)
    spacing = tuple(float(np.linalg.norm(new_affine[:3, axis])) for axis in (2, 1, 0))
    return data.transpose(2, 1, 0), new_affine, spacing


#: NIfTI affines are RAS+; flipping x and y makes them LPS+ like DICOM.
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
