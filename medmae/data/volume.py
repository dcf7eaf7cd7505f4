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
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from medmae.data.cache import ManifestRow, SeriesRecord
from medmae.data.index import Selection, SliceIndex, select_series, series_weights
from medmae.data.intensity import IntensityRule, number, pair

Triple = tuple[float, float, float]
Size3 = tuple[int, int, int]

#: most voxels tested for the foreground fraction of a 3D crop (a regular subsample of the box)
FOREGROUND_POINTS = 32768


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


# ----------------------------------------------------------------------------- series selection


def series_extent_mm(row: SeriesRecord) -> Triple:
    """Physical extent of a series along (Z, Y, X): voxels times spacing."""
    return tuple(float(n) * float(s) for n, s in zip(row.shape, row.spacing, strict=True))  # type: ignore[return-value]


def select_volumes(
    rows: Sequence[ManifestRow], *, split: str, options: VolumeOptions, modalities: Sequence[str] | None = None
) -> Selection:
    """The rows of ``split`` the 3D model can use, and per reason how many were dropped.

    Modality and kind checks are :func:`~medmae.data.index.select_series`'s (reasons ``modality``,
    ``image``); then ``volume_anisotropy`` and ``volume_coverage`` (see the module docstring).
    """
    base = select_series(
        rows, split=split, modalities=modalities, include_images=False, max_anisotropy=math.inf, min_size=1
    )
    kept: list[ManifestRow] = []
    dropped: Counter[str] = Counter(base.dropped)
    fov = options.fov_mm
    for row in base.rows:
        spacing = [float(s) for s in row.spacing]
        extent = series_extent_mm(row)
        if max(spacing) / min(spacing) > options.max_anisotropy:
            dropped["volume_anisotropy"] += 1
        elif any(e < options.min_coverage * f for e, f in zip(extent, fov, strict=True)):
            dropped["volume_coverage"] += 1
        else:
            kept.append(row)
    return Selection(rows=tuple(kept), dropped=dropped)


class VolumeIndex:
    """The series a 3D dataset draws from, one position per series, with sampling weights.

    Series ``i`` is drawn with probability proportional to ``v_i ** alpha``, ``v_i`` its physical
    volume in units of the output field of view (how many distinct crops it holds): ``alpha = 0``
    every series equally, ``1`` proportional to its size. Exposes what the sampler and the datamodule
    need from an index (``len``, ``draw``, ``rows``, ``composition``, ``describe``).
    """

    def __init__(self, rows: Sequence[ManifestRow], options: VolumeOptions, alpha: float = 0.5) -> None:
        self.rows: tuple[ManifestRow, ...] = tuple(rows)
        self.options = options
        self.alpha = float(alpha)
        fov = math.prod(options.fov_mm)
        self.sizes = np.array([max(math.prod(series_extent_mm(r)) / fov, 1e-6) for r in self.rows], dtype=np.float64)
        self.series_probs = series_weights(self.sizes, self.alpha) if self.rows else np.zeros(0)
        self._cum = np.cumsum(self.series_probs)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def num_series(self) -> int:
        return len(self.rows)

    def draw(self, rng: np.random.Generator, size: int | None = None) -> np.ndarray | int:
        """Draw series positions with replacement by weight (one uniform draw per position)."""
        if not self.rows:
            raise ValueError("cannot draw from an empty volume index")
        n = 1 if size is None else int(size)
        u = rng.random(n)
        series = np.minimum(np.searchsorted(self._cum, u * self._cum[-1], side="right"), len(self.rows) - 1)
        return int(series[0]) if size is None else series.astype(np.int64)

    def composition(self) -> dict[str, object]:
        """Counts of series, axial slices and patients by modality, source and kind (no ids)."""
        return SliceIndex(self.rows, "axial", self.alpha).composition()

    def describe(self) -> dict[str, object]:
        """Counts for logs and reports (no ids)."""
        return {
            "series": self.num_series,
            "modalities": dict(sorted(Counter(r.modality for r in self.rows).items())),
        }


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
