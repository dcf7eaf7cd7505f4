"""3D samples from the cache: crops in millimetres, resampled to a target spacing, for the 3D MAE.

Every cached series is a canonical (Z, Y, X) array (Z inferior -> superior, Y anterior -> posterior,
X patient right -> left; see ``medmae.data.index``) with its voxel spacing in mm. A 3D sample is a
box of the patient resampled onto a grid of ``size`` voxels at ``spacing_mm``, in that same
orientation; the model sees it as ``(C, Z, Y, X)``.

Order of operations (one sample)::

    crop plan from the sample RNG: scale, per-axis aspect, position, flips    (no voxel touched)
    read only the box of stored voxels the crop needs from the memory map    (reader.read_box)
    -> float32 -> intensity: CT window(s) in HU / stored percentiles, linear, not yet clipped
    -> separable linear resampling onto the output grid; outside the volume = 0
    -> clip to [0, 1] -> flips

The intensity map is linear, so applying it before the (linear) resampling gives the same numbers
as after, and the clip comes last, as in 2D. Voxels of the output grid that fall outside the series
(a crop larger than the scan) are 0, the value the window's or percentile range's low end maps to.

Crop geometry (training): the output grid covers ``size * spacing_mm`` mm (its *field of view*).
A crop covers ``fov * f`` mm with per-axis factors ``f_i = s**(1/3) * a_i`` where the volume
fraction ``s`` is uniform in ``crop_scale`` and the aspects ``a_i`` are log-uniform in
``crop_aspect``, normalised to a product of 1. ``s < 1`` zooms in (finer than ``spacing_mm``),
``s > 1`` out. The crop's position is uniform over the positions that keep it inside the series
(or, along an axis where it is larger than the series, that keep the series inside it).
Validation and inference use ``s = 1`` (exactly ``spacing_mm``) and the centred position.

Resampling is linear along each axis in turn (trilinear), at voxel centres (``align_corners=False``),
without anti-aliasing, as MONAI ``Spacing`` does. Series the 3D model cannot use are dropped by
:func:`select_volumes` with a counted reason: single 2D images (``image``), series spanning less
than ``min_coverage`` of the field of view along some axis (``volume_coverage``), and voxels more
than ``max_anisotropy`` times longer along one axis than another (``volume_anisotropy``).

The options (:class:`VolumeOptions`, ``volume_options.py``) and the series selection and sampling
(:func:`select_volumes`, :class:`VolumeIndex`, ``volume_index.py``) live in their own modules
(issue 19) and are re-exported here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from medmae.data.cache import SeriesRecord
from medmae.data.intensity import IntensityRule
from medmae.data.volume_index import VolumeIndex, select_volumes, series_extent_mm, series_volumes_mm3
from medmae.data.volume_options import Size3, Triple, VolumeOptions

__all__ = [
    "FOREGROUND_POINTS",
    "Size3",
    "Triple",
    "VolumeCrop",
    "VolumeIndex",
    "VolumeOptions",
    "VolumeTransform",
    "foreground_fraction_3d",
    "grid_coordinates",
    "plan_crop",
    "resample_axis",
    "resample_box",
    "resample_labels",
    "resample_volume",
    "restore_volume",
    "sample_positions",
    "select_volumes",
    "series_extent_mm",
    "series_volumes_mm3",
]

#: most voxels tested for the foreground fraction of a 3D crop (a regular subsample of the box)
FOREGROUND_POINTS = 32768


# ----------------------------------------------------------------------------- crop geometry


@dataclass(frozen=True)
class VolumeCrop:
    """A crop in source voxel coordinates (edges: voxel ``i`` spans ``[i, i + 1)``) plus its flips."""

    start: Triple
    extent: Triple
    flips: tuple[bool, bool, bool]

    def read_box(self, shape: Sequence[int]) -> tuple[tuple[int, int], ...]:
        """The ``[lo, hi)`` voxel range per axis that linear resampling of this crop touches."""
        box = []
        for s, e, n in zip(self.start, self.extent, shape, strict=True):
            lo = max(0, math.floor(s - 0.5))
            hi = min(int(n), math.ceil(s + e + 0.5))
            box.append((lo, max(hi, lo + 1)) if lo < n else (int(n) - 1, int(n)))
        return tuple(box)


def plan_crop(
    rng: np.random.Generator | None, shape: Sequence[int], spacing: Sequence[float], options: VolumeOptions
) -> VolumeCrop:
    """The crop of one sample: random (``rng`` given) or the centred ``spacing_mm`` view (``rng=None``).

    A random crop consumes the same draws whatever the series (scale, 3 aspects, 3 positions,
    3 flips), so one sample's RNG stream never depends on the series it lands on.
    """
    fov = options.fov_mm
    if rng is None:
        factors = (1.0, 1.0, 1.0)
        u_pos = np.full(3, 0.5)
        flips = (False, False, False)
    else:
        s = rng.uniform(*options.crop_scale)
        log_a = rng.uniform(math.log(options.crop_aspect[0]), math.log(options.crop_aspect[1]), 3)
        log_a -= log_a.mean()
        factors = tuple(float(s ** (1 / 3) * math.exp(a)) for a in log_a)
        u_pos = rng.random(3)
        u_flip = rng.random(3)
        flips = tuple(bool(u < p) for u, p in zip(u_flip, options.flip_prob, strict=True))  # type: ignore[assignment]
    extent = tuple(f * fv / float(sp) for f, fv, sp in zip(factors, fov, spacing, strict=True))
    # room is negative when the crop is larger than the series: the series then lies inside the crop
    start = tuple(float(u) * (int(n) - e) for u, n, e in zip(u_pos, shape, extent, strict=True))
    return VolumeCrop(start, extent, flips)  # type: ignore[arg-type]


def sample_positions(start: float, extent: float, n_out: int, lo: int) -> torch.Tensor:
    """Source coordinates (voxel centres, relative to a read box starting at ``lo``) of ``n_out`` output voxels."""
    j = torch.arange(n_out, dtype=torch.float64)
    return start + (j + 0.5) * (extent / n_out) - 0.5 - lo


def resample_axis(x: torch.Tensor, dim: int, coords: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Linear interpolation of ``x`` along ``dim`` at ``coords`` (voxel-centre coordinates of ``x``).

    Coordinates within half a voxel outside ``x`` take the edge value; ``valid`` (bool, like
    ``coords``) zeroes the others (outside the series).
    """
    m = x.shape[dim]
    floor = torch.floor(coords)
    w = (coords - floor).to(x.dtype)
    i0 = floor.long().clamp(0, m - 1)
    i1 = (floor.long() + 1).clamp(0, m - 1)
    shape = [1] * x.ndim
    shape[dim] = -1
    w = w.view(shape)
    out = x.index_select(dim, i0) * (1 - w) + x.index_select(dim, i1) * w
    if valid is not None:
        out = out * valid.to(x.dtype).view(shape)
    return out


def resample_box(
    values: torch.Tensor,
    box: Sequence[tuple[int, int]],
    crop: VolumeCrop,
    series_shape: Sequence[int],
    out_shape: Sequence[int],
) -> torch.Tensor:
    """Resample ``values`` ``(C, *box extent)`` (the read box of a series) onto the crop's output grid."""
    x = values
    for axis in range(3):
        lo = box[axis][0]
        coords = sample_positions(crop.start[axis], crop.extent[axis], int(out_shape[axis]), lo)
        full = coords + lo
        valid = (full >= -0.5) & (full <= int(series_shape[axis]) - 0.5)
        x = resample_axis(x, axis + 1, coords, valid)
    return x


def foreground_fraction_3d(box: np.ndarray, threshold: float, max_points: int = FOREGROUND_POINTS) -> float:
    """Fraction of voxels of a ``(z, y, x)`` box above ``threshold``, on a regular subsample."""
    step = max(1, int(round((box.size / max_points) ** (1 / 3))))
    sub = box[::step, ::step, ::step]
    return float(np.count_nonzero(sub > threshold)) / max(1, sub.size)


class VolumeTransform:
    """Crop plan, foreground test and stored values -> ``(C, Z, Y, X)`` float32 in [0, 1] for one volume.

    Args:
        options: the sample geometry (:class:`VolumeOptions`).
        intensity: the intensity and foreground rule shared with 2D (:class:`IntensityRule`).
    """

    def __init__(self, options: VolumeOptions, intensity: IntensityRule) -> None:
        self.options = options
        self.intensity = intensity

    @property
    def channels(self) -> int:
        return self.intensity.groups

    @property
    def out_shape(self) -> Size3:
        return self.options.shape

    def plan(self, rng: np.random.Generator, record: SeriesRecord, random_crop: bool) -> VolumeCrop:
        return plan_crop(rng if random_crop else None, record.shape, record.spacing, self.options)

    def is_foreground(self, box: np.ndarray, record: SeriesRecord) -> bool:
        """Whether the read box has at least ``foreground_fraction`` foreground voxels (always when off)."""
        if self.intensity.foreground_fraction <= 0.0:
            return True
        threshold = self.intensity.foreground_threshold(record)
        return foreground_fraction_3d(box, threshold) >= self.intensity.foreground_fraction

    def __call__(
        self,
        box_values: np.ndarray,
        box: Sequence[tuple[int, int]],
        crop: VolumeCrop,
        record: SeriesRecord,
        rng: np.random.Generator,
    ) -> torch.Tensor:
        """The read box of stored values -> the sample ``(C, Z, Y, X)`` (one RNG draw for the CT window)."""
        ranges = self.intensity.ranges(record, rng)
        values = torch.from_numpy(np.ascontiguousarray(box_values)).float()
        if record.dtype == "float32":
            values = torch.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
        mapped = torch.stack([(values - lo) / (hi - lo) for lo, hi in ranges])
        out = resample_box(mapped, box, crop, record.shape, self.out_shape).clamp_(0.0, 1.0)
        dims = [d + 1 for d, f in enumerate(crop.flips) if f]
        if dims:
            out = out.flip(dims)
        return out.float().contiguous()

    def describe(self) -> dict[str, object]:
        """JSON-able record of every choice (the 3D half of ``CacheDataModule.preprocessing``)."""
        o = self.options
        return {
            "spatial_dims": 3,
            "volume": {
                "size": list(o.shape),
                "axes": (
                    "canonical (Z, Y, X): Z inferior -> superior, Y anterior -> posterior, X patient right -> left"
                ),
                "spacing_mm": list(o.spacing),
                "resample": {
                    "method": "linear along each axis (trilinear) at voxel centres (align_corners=False)",
                    "antialias": False,
                    "outside_series": "0 (after intensity scaling)",
                },
                "crop": {
                    "train": "volume fraction of the field of view uniform in scale, per-axis log-uniform aspect "
                    "normalised to product 1, position uniform",
                    "scale": list(o.crop_scale),
                    "aspect": list(o.crop_aspect),
                    "val": "centred, scale 1 (exactly spacing_mm)",
                    "inference": "the whole series resampled to spacing_mm, sliding windows of size",
                },
                "flip_prob": list(o.flip_prob),
                "min_coverage": o.min_coverage,
                "max_anisotropy": o.max_anisotropy,
            },
            "channels": self.channels,
            "channel_layout": ("one channel per CT window" if self.intensity.groups > 1 else "one channel (the scan)"),
            "order": "read box of stored values -> float32 -> intensity (linear) -> resample -> clip [0, 1] -> flip",
            **self.intensity.describe("the crop's read box, stored values, regular subsample of ~32768 voxels"),
        }


def grid_coordinates(n: int, spacing: float, target_spacing: float) -> torch.Tensor:
    """Source voxel coordinates of the grid at ``target_spacing`` covering the same extent as ``n`` voxels.

    Output voxel ``j`` sits at ``(j + 0.5) * target / source - 0.5`` source voxels; there are
    ``round(n * source / target)`` of them (at least 1). Images and labels share this grid.
    """
    ratio = float(target_spacing) / float(spacing)
    n_out = max(1, int(round(n / ratio)))
    return sample_positions(0.0, n_out * ratio, n_out, 0)


def resample_volume(
    volume: np.ndarray | torch.Tensor, spacing: Sequence[float], target_spacing: Sequence[float]
) -> torch.Tensor:
    """A whole ``(C, Z, Y, X)`` volume resampled to ``target_spacing`` (linear; :func:`grid_coordinates`).

    The inference view of the training crops: the same coordinates and the same linear rule.
    """
    x = torch.as_tensor(volume).float()
    if x.ndim != 4:
        raise ValueError(f"expected a (C, Z, Y, X) volume, got shape {tuple(x.shape)}")
    for axis in range(3):
        coords = grid_coordinates(x.shape[axis + 1], spacing[axis], target_spacing[axis])
        x = resample_axis(x, axis + 1, coords)
    return x


def resample_labels(
    labels: np.ndarray | torch.Tensor, spacing: Sequence[float], target_spacing: Sequence[float]
) -> torch.Tensor:
    """A ``(Z, Y, X)`` label map onto the :func:`resample_volume` grid by nearest neighbour.

    Output voxel ``j`` takes source voxel ``round(coordinate)`` (clamped to the volume), the same
    coordinates as the image, so image and labels stay aligned.
    """
    x = torch.as_tensor(np.asarray(labels)).long()
    if x.ndim != 3:
        raise ValueError(f"expected a (Z, Y, X) label map, got shape {tuple(x.shape)}")
    for axis in range(3):
        n = x.shape[axis]
        coords = grid_coordinates(n, spacing[axis], target_spacing[axis])
        x = x.index_select(axis, torch.floor(coords + 0.5).long().clamp(0, n - 1))
    return x


def restore_volume(
    output: torch.Tensor, shape: Sequence[int], spacing: Sequence[float], target_spacing: Sequence[float]
) -> torch.Tensor:
    """Bring a ``(C, z, y, x)`` output on the :func:`resample_volume` grid back onto the series' grid
    of ``shape`` (linear, for probabilities or logits): source voxel ``i`` sits at
    ``(i + 0.5) * source / target - 0.5`` output voxels."""
    x = output
    for axis in range(3):
        n = int(shape[axis])
        ratio = float(target_spacing[axis]) / float(spacing[axis])
        coords = sample_positions(0.0, n / ratio, n, 0)
        x = resample_axis(x, axis + 1, coords)
    return x
