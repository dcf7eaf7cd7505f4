"""What a 3D sample is: :class:`VolumeOptions`, the ``data.volume`` section of a config.

Split out of ``medmae.data.volume`` (issue 19): the options are configuration, read by the
datamodule, the transform and the export card alike, while ``volume.py`` does the geometry and
``volume_index.py`` the series selection. Every name is still importable from ``medmae.data.volume``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from medmae.data.intensity import number, pair

Triple = tuple[float, float, float]
Size3 = tuple[int, int, int]


def _triple(value: object, field: str) -> Triple:
    if isinstance(value, bool):
        raise ValueError(f"{field} must be a number or three numbers, got {value!r}")
    if isinstance(value, int | float):
        v = number(value, field)
        return v, v, v
    if isinstance(value, str) or not isinstance(value, Sequence) or len(value) != 3:
        raise ValueError(f"{field} must be a number or three numbers (Z, Y, X), got {value!r}")
    a, b, c = (number(v, field) for v in value)
    return a, b, c


@dataclass(frozen=True)
class VolumeOptions:
    """What a 3D sample is: the ``data.volume`` section of a config (set it to train the 3D MAE).

    Args:
        size: output grid ``(Z, Y, X)`` in voxels (an int = a cube); the model's ``img_size``.
        spacing_mm: output voxel spacing ``(Z, Y, X)`` in mm (a number = isotropic), all > 0.
        crop_scale: range of the crop's volume as a fraction of the output field of view
            (``size * spacing_mm``); ``(1, 1)`` = always exactly ``spacing_mm``.
        crop_aspect: range of each axis' extra stretch (log-uniform, normalised so the three
            multiply to 1); ``(1, 1)`` keeps the field of view's shape.
        flip_prob: probability of a flip along each of Z, Y, X (a number = the same for all three);
            default left-right only (anatomy has no up-down mirror symmetry).
        min_coverage: a series must span at least this fraction of the field of view along every
            axis (otherwise reason ``volume_coverage``); the rest of a crop is padded with 0.
        max_anisotropy: largest allowed ratio of a series' largest to smallest voxel spacing
            (otherwise reason ``volume_anisotropy``): a 5 mm-slice CT with 0.7 mm pixels is 7.

    Example YAML::

        data:
          cache_dir: cache
          batch_size: 4
          volume: {size: [96, 96, 96], spacing_mm: 1.5, crop_scale: [0.5, 1.5]}
    """

    size: int | tuple[int, int, int] = 96
    spacing_mm: float | tuple[float, float, float] = 1.5
    crop_scale: tuple[float, float] = (0.5, 1.5)
    crop_aspect: tuple[float, float] = (0.8, 1.25)
    flip_prob: float | tuple[float, float, float] = (0.0, 0.0, 0.5)
    min_coverage: float = 0.5
    max_anisotropy: float = 4.0

    def __post_init__(self) -> None:
        size = self.size
        if isinstance(size, int) and not isinstance(size, bool):
            size = (size, size, size)
        if (
            isinstance(size, str)
            or not isinstance(size, Sequence)
            or len(size) != 3
            or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size)
        ):
            raise ValueError(f"data.volume.size must be a positive int or three positive ints (Z, Y, X), got {size!r}")
        spacing = _triple(self.spacing_mm, "data.volume.spacing_mm")
        if not all(s > 0 for s in spacing):
            raise ValueError(f"data.volume.spacing_mm must be > 0 mm along every axis, got {self.spacing_mm!r}")
        s_lo, s_hi = pair(self.crop_scale, "data.volume.crop_scale")
        if not (0.0 < s_lo <= s_hi and math.isfinite(s_hi)):
            raise ValueError(f"data.volume.crop_scale must satisfy 0 < low <= high, got {self.crop_scale!r}")
        a_lo, a_hi = pair(self.crop_aspect, "data.volume.crop_aspect")
        if not (0.0 < a_lo <= 1.0 <= a_hi and math.isfinite(a_hi)):
            raise ValueError(f"data.volume.crop_aspect must satisfy 0 < low <= 1 <= high, got {self.crop_aspect!r}")
        flips = _triple(self.flip_prob, "data.volume.flip_prob")
        if not all(0.0 <= p <= 1.0 for p in flips):
            raise ValueError(f"data.volume.flip_prob must lie in [0, 1], got {self.flip_prob!r}")
        if not 0.0 < number(self.min_coverage, "data.volume.min_coverage") <= 1.0:
            raise ValueError(f"data.volume.min_coverage must be in (0, 1], got {self.min_coverage!r}")
        if not number(self.max_anisotropy, "data.volume.max_anisotropy") >= 1.0:
            raise ValueError(f"data.volume.max_anisotropy must be >= 1, got {self.max_anisotropy!r}")
        object.__setattr__(self, "size", tuple(int(s) for s in size))
        object.__setattr__(self, "spacing_mm", spacing)
        object.__setattr__(self, "crop_scale", (s_lo, s_hi))
        object.__setattr__(self, "crop_aspect", (a_lo, a_hi))
        object.__setattr__(self, "flip_prob", flips)
        object.__setattr__(self, "min_coverage", float(self.min_coverage))
        object.__setattr__(self, "max_anisotropy", float(self.max_anisotropy))

    @property
    def shape(self) -> Size3:
        return self.size  # type: ignore[return-value]

    @property
    def spacing(self) -> Triple:
        return self.spacing_mm  # type: ignore[return-value]

    @property
    def fov_mm(self) -> Triple:
        """Field of view of the output grid along (Z, Y, X) in mm."""
        return tuple(n * s for n, s in zip(self.shape, self.spacing, strict=True))  # type: ignore[return-value]
