"""Which planes form the channels of a 2.5D sample: adjacent by index, or at fixed millimetre offsets.

Channel ``j`` of a sample centred on plane ``c`` has the integer offset ``o_j`` (for ``k`` slices
``-(k-1)//2 .. k//2``). Two rules place it along the slicing axis:

* **index adjacency** (``spacing_mm=None``, the default and what old cards mean): plane ``c + o_j``.
  A 0.625 mm and a 5 mm series then give channels 0.625 mm and 5 mm apart.
* **millimetre offsets** (``spacing_mm=s``): the position ``c * d + o_j * s`` mm, ``d`` being the
  series' spacing along the axis, i.e. the fractional plane ``t_j = c + o_j * s / d``.
  ``nearest`` takes the nearest plane (ties go away from the centre, so the rule is symmetric);
  ``linear`` blends the two planes around ``t_j`` in float (the centre channel is always the
  centre plane itself). Series coarser than ``s`` are not used for pretraining (the neighbours
  would be interpolated or repeated, not seen): :func:`fits_slice_spacing`.

Either way positions beyond the series are clamped to its first/last plane (the edge plane is
repeated). Both training (``SliceTransform`` via the dataset) and fine-tuning/inference
(``PlanePreprocessor``) use this one module, so they cannot drift apart. No randomness is used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

SLICE_INTERPOLATIONS = ("nearest", "linear")
#: A series is fine enough for ``slice_spacing_mm = s`` when its spacing along the axis is at most
#: ``s * (1 + SLICE_SPACING_RTOL)``: room for header rounding (2.5 vs 2.5003 mm), not for 2.6 mm.
SLICE_SPACING_RTOL = 0.01
#: Fractional plane positions within this of a whole plane count as that plane (float noise).
_SNAP = 1e-6


def centred_offsets(slices: int) -> tuple[int, ...]:
    """Channel offsets ``-(k-1)//2 .. k//2`` of ``k`` slices (for odd ``k`` symmetric)."""
    return tuple(range(-((slices - 1) // 2), slices // 2 + 1))


def fits_slice_spacing(axis_spacing: float | None, spacing_mm: float | None) -> bool:
    """Whether a series with ``axis_spacing`` mm between planes (``None``: a single 2D image, no
    through-plane geometry) shows real planes at multiples of ``spacing_mm``; always true when the
    rule is index adjacency (``spacing_mm is None``)."""
    if spacing_mm is None:
        return True
    if axis_spacing is None:
        return False
    return axis_spacing <= spacing_mm * (1.0 + SLICE_SPACING_RTOL)


@dataclass(frozen=True)
class PlanePick:
    """The planes to read for one sample and how to turn them into its channels.

    ``indices`` are plane numbers (in range, repeats allowed). Without ``weights`` the planes are the
    channels. With ``weights`` (``linear``), ``indices`` holds the ``k`` lower planes followed by the
    ``k`` upper ones, and channel ``j`` is ``(1 - w_j) * lower_j + w_j * upper_j``.
    """

    indices: np.ndarray
    weights: np.ndarray | None = None

    def channels(self, planes: np.ndarray) -> np.ndarray:
        """The ``(k, h, w)`` channel stack from the ``(len(indices), h, w)`` planes read.

        Index adjacency and ``nearest`` return ``planes`` unchanged (storage dtype); ``linear``
        returns float32, blended before any resize or intensity scaling.
        """
        if self.weights is None:
            return planes
        k = len(self.weights)
        w = self.weights.astype(np.float32)[:, None, None]
        lower = planes[:k].astype(np.float32)
        upper = planes[k:].astype(np.float32)
        return lower * (1.0 - w) + upper * w


@dataclass(frozen=True)
class SliceNeighbours:
    """The rule placing a sample's channels along the slicing axis (see the module docstring).

    Args:
        offsets: integer channel offsets from the centre plane, in channel order.
        spacing_mm: millimetres per offset step; ``None`` = index adjacency (one plane per step).
        interpolation: ``"nearest"`` or ``"linear"`` (only used with ``spacing_mm``).

    Examples::

        >>> rule = SliceNeighbours((-1, 0, 1), spacing_mm=2.5)
        >>> rule.pick(centre=32, n_slices=65, axis_spacing=0.625).indices.tolist()
        [28, 32, 36]
    """

    offsets: tuple[int, ...] = (0,)
    spacing_mm: float | None = None
    interpolation: str = "nearest"

    def __post_init__(self) -> None:
        ints = all(isinstance(o, int | np.integer) and not isinstance(o, bool) for o in self.offsets)
        if not self.offsets or not ints:
            raise ValueError(f"slice offsets must be a non-empty list of ints, got {self.offsets!r}")
        s = self.spacing_mm
        if s is not None and (
            isinstance(s, bool) or not isinstance(s, int | float) or not math.isfinite(s) or not s > 0
        ):
            raise ValueError(f"slice_spacing_mm must be a positive number of millimetres or None, got {s!r}")
        if self.interpolation not in SLICE_INTERPOLATIONS:
            raise ValueError(f"slice_interpolation must be one of {SLICE_INTERPOLATIONS}, got {self.interpolation!r}")

    @classmethod
    def centred(cls, slices: int, spacing_mm: float | None = None, interpolation: str = "nearest") -> SliceNeighbours:
        """``slices`` channels around the centre; with one slice there is no neighbour, so the rule
        is index adjacency whatever ``spacing_mm`` says (nothing to place, nothing to filter)."""
        rule = cls(centred_offsets(slices), spacing_mm, interpolation)  # validates spacing_mm either way
        return rule if slices > 1 else replace(rule, spacing_mm=None)

    @property
    def by_distance(self) -> bool:
        """Whether channels are placed in millimetres (and the series' spacing is needed)."""
        return self.spacing_mm is not None and any(o != 0 for o in self.offsets)

    def offsets_mm(self) -> list[float] | None:
        """Channel positions relative to the centre in mm (``None`` under index adjacency)."""
        if not self.by_distance:
            return None
        return [o * float(self.spacing_mm) for o in self.offsets]  # type: ignore[arg-type]

    def pick(self, centre: int, n_slices: int, axis_spacing: float | None = None) -> PlanePick:
        """The planes of the sample centred on plane ``centre`` of a series of ``n_slices`` planes.

        Args:
            centre: the centre plane.
            n_slices: planes of the series along the axis.
            axis_spacing: mm between the series' planes along the axis; required when
                :attr:`by_distance` (``ValueError`` otherwise).
        """
        offsets = np.asarray(self.offsets, dtype=np.int64)
        last = n_slices - 1
        if not self.by_distance:
            return PlanePick(np.clip(centre + offsets, 0, last))
        if axis_spacing is None or not math.isfinite(axis_spacing) or not axis_spacing > 0:
            raise ValueError(
                f"slice_spacing_mm={self.spacing_mm} places channels in millimetres and needs the series' "
                f"spacing along the slicing axis, got {axis_spacing!r}"
            )
        steps = offsets * (float(self.spacing_mm) / float(axis_spacing))  # type: ignore[arg-type]
        if self.interpolation == "nearest":
            # round half away from the centre: symmetric for -o and +o
            whole = np.sign(steps) * np.floor(np.abs(steps) + 0.5 + _SNAP)
            return PlanePick(np.clip(centre + whole.astype(np.int64), 0, last))
        target = np.clip(centre + steps, 0.0, float(last))
        lower = np.floor(target + _SNAP).astype(np.int64)
        weights = target - lower
        weights[np.abs(weights) < _SNAP] = 0.0
        lower = np.minimum(lower, last)
        upper = np.where(weights > 0.0, np.minimum(lower + 1, last), lower)
        return PlanePick(np.concatenate([lower, upper]), np.clip(weights, 0.0, 1.0))

    def describe(self) -> dict[str, object]:
        """The card fields of this rule (``CacheDataModule.preprocessing``; read by ``preprocessing_from_card``)."""
        if self.by_distance:
            how = (
                "the nearest plane (ties away from the centre)"
                if self.interpolation == "nearest"
                else "the two bracketing planes blended linearly in float, before resize and intensity"
            )
            positions = (
                "channel j at the centre plane's position + slice_offsets[j] * slice_spacing_mm along the axis, "
                f"using the series' own spacing along the axis: {how}"
            )
        else:
            positions = "channel j is plane centre + slice_offsets[j] (adjacent by array index, whatever the spacing)"
        return {
            "slice_offsets": [int(o) for o in self.offsets],
            "slice_spacing_mm": float(self.spacing_mm) if self.by_distance else None,  # type: ignore[arg-type]
            "slice_offsets_mm": self.offsets_mm(),
            "slice_interpolation": self.interpolation,
            "slice_positions": positions,
            "slice_edges": "clamp (positions beyond the series take its edge plane)",
        }
