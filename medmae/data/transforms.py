"""Per-sample transforms: MAE random-resized crop, flip, resize and per-modality intensity.

Order of operations (DESIGN.md section 3: cropping the stored integers first is ~8x cheaper)::

    crop box + flip decided from the sample RNG        (no pixel touched)
    read only that box from the memory-mapped array    (storage dtype, e.g. int16; reader.py)
    -> the channels' planes                            (neighbours.py: adjacent by index, or at
                                                        slice_spacing_mm offsets; linear blends in float)
    -> float32 -> resize to the output size            (torch interpolate, antialiased)
    -> intensity: CT window(s) in HU / percentile scaling for the rest, clipped to [0, 1]

Why not MONAI's array transforms for the heavy steps (measured here, 512² int16 slice -> 224²):
MONAI ``SpatialCrop``/``RandSpatialCrop`` first convert their whole input to a tensor (for a
memory-mapped volume that reads the entire series), so the crop is numpy slicing of the map;
MONAI ``Resize`` calls the same ``torch.nn.functional.interpolate`` but adds ~0.4 ms of MetaTensor
bookkeeping and offers anti-aliasing only as a Gaussian pre-filter (~15 ms per sample), against
0.3-0.55 ms for torch's own antialiased bilinear/bicubic. Without antialiasing our resize and
intensity scaling give the same numbers as MONAI ``Resize``/``ScaleIntensityRange`` (tested).

The crop follows torchvision's ``RandomResizedCrop.get_params`` (the MAE recipe): area fraction
``scale`` uniform, aspect ratio log-uniform in ``ratio``, 10 tries, then the central crop. ``ratio``
is the crop's width/height *relative to the output's* width/height, so the distortion of the final
resize stays within ``ratio`` also for non-square outputs (for square outputs this is exactly MAE).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from medmae.data.cache import SeriesRecord
from medmae.data.intensity import (  # noqa: F401  (re-exported: the names' historical home)
    CT_WINDOW_MODES,
    DEFAULT_CT_WINDOWS,
    PERCENTILE_RULE,
    IntensityRule,
    number,
    pair,
    window_range,
)
from medmae.data.neighbours import PlanePick, SliceNeighbours

INTERPOLATIONS = ("bilinear", "bicubic")


@dataclass(frozen=True)
class CropBox:
    """A box in plane pixel coordinates: rows ``top:top+height``, columns ``left:left+width``."""

    top: int
    left: int
    height: int
    width: int


def random_resized_crop_box(
    rng: np.random.Generator,
    size: tuple[int, int],
    scale: tuple[float, float] = (0.2, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    out_aspect: float = 1.0,
    attempts: int = 10,
) -> CropBox:
    """Sample a random-resized-crop box (torchvision's algorithm; ``ratio`` relative to ``out_aspect``).

    Args:
        rng: the sample's generator (consumes 4 draws per attempt).
        size: ``(height, width)`` of the plane.
        scale: range of the crop area as a fraction of the plane area.
        ratio: range of the crop's width/height divided by ``out_aspect``.
        out_aspect: output width / height.
        attempts: tries before falling back to the central crop.

    Examples::

        >>> box = random_resized_crop_box(np.random.default_rng(0), (512, 512))
        >>> 0.2 * 512 * 512 <= box.height * box.width * 1.01
        True
    """
    height, width = size
    area = height * width
    log_lo, log_hi = math.log(ratio[0] * out_aspect), math.log(ratio[1] * out_aspect)
    for _ in range(attempts):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return CropBox(top, left, h, w)
    in_aspect = width / height
    lo_aspect, hi_aspect = ratio[0] * out_aspect, ratio[1] * out_aspect
    if in_aspect < lo_aspect:
        w, h = width, max(1, min(height, int(round(width / lo_aspect))))
    elif in_aspect > hi_aspect:
        h, w = height, max(1, min(width, int(round(height * hi_aspect))))
    else:
        h, w = height, width
    return CropBox((height - h) // 2, (width - w) // 2, h, w)


def center_crop_box(size: tuple[int, int], out_aspect: float = 1.0) -> CropBox:
    """The largest centred box of aspect ``out_aspect`` (width/height) inside a plane of ``size``."""
    height, width = size
    if width / height > out_aspect:
        h, w = height, max(1, min(width, int(round(height * out_aspect))))
    else:
        w, h = width, max(1, min(height, int(round(width / out_aspect))))
    return CropBox((height - h) // 2, (width - w) // 2, h, w)


def resize(image: torch.Tensor, size: tuple[int, int], mode: str = "bilinear", antialias: bool = True) -> torch.Tensor:
    """Resize a channel-first ``(C, h, w)`` float tensor to ``(C, *size)``."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    out = F.interpolate(image[None], size=size, mode=mode, align_corners=False, antialias=antialias)
    return out[0]


def scale_intensity(image: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """Map ``[low, high]`` linearly to ``[0, 1]`` and clip (MONAI ``ScaleIntensityRange(clip=True)``)."""
    return ((image - low) / (high - low)).clamp_(0.0, 1.0)


def foreground_fraction(plane: np.ndarray, threshold: float, max_points: int = 4096) -> float:
    """Fraction of pixels of a 2D plane above ``threshold``, on a regular subsample of ~``max_points``."""
    h, w = plane.shape[-2:]
    step = max(1, int(math.sqrt(h * w / max_points)))
    sub = plane[..., ::step, ::step]
    return float(np.count_nonzero(sub > threshold)) / sub.size


class SliceTransform:
    """Everything done to one sample after its slices are chosen: crop plan, flip, resize, intensity.

    The dataset asks :meth:`plan` for the crop box and flip (both from the sample's RNG), reads that
    box of the chosen slices from the cache in the storage dtype, optionally checks
    :meth:`is_foreground`, then calls the transform on the slab.

    Args:
        out_size: output ``(height, width)``.
        slices: number of slices per sample (1 = 2D).
        slice_spacing_mm: ``None`` = the slices are adjacent planes by array index; a number = they
            sit that many millimetres apart along the axis, whatever the series' spacing
            (``medmae.data.neighbours``; ignored when ``slices == 1``).
        slice_interpolation: ``"nearest"`` plane or ``"linear"`` blend of the two bracketing planes,
            for ``slice_spacing_mm``.
        crop_scale: random-resized-crop area fraction range, within (0, 1].
        crop_ratio: crop aspect range (width/height relative to the output's), ``0 < lo <= hi``.
        hflip_prob: probability of a left-right flip (training crops only).
        interpolation: ``"bilinear"`` or ``"bicubic"`` (MAE's torchvision pipeline uses bicubic;
            antialiased bilinear costs 0.32 ms against 0.57 ms per 512² -> 224² crop here).
        antialias: antialias when downscaling (as torchvision / PIL do in the MAE recipe).
        intensity: the intensity and foreground rule (:class:`~medmae.data.intensity.IntensityRule`,
            shared with 3D volumes); default: its defaults (soft tissue, lung and bone windows drawn
            at random, percentiles 0.5-99.5, no foreground filter).

    Examples::

        t = SliceTransform((224, 224), slices=3, intensity=IntensityRule.checked(ct_windows=[(40, 400)]))
        box, flip = t.plan(rng, (512, 512), random_crop=True)
        image = t(slab_int16, row, rng)      # (3, 224, 224) float32 in [0, 1]
    """

    def __init__(
        self,
        out_size: tuple[int, int],
        slices: int = 1,
        slice_spacing_mm: float | None = None,
        slice_interpolation: str = "nearest",
        crop_scale: tuple[float, float] = (0.2, 1.0),
        crop_ratio: tuple[float, float] = (3 / 4, 4 / 3),
        hflip_prob: float = 0.5,
        interpolation: str = "bilinear",
        antialias: bool = True,
        intensity: IntensityRule | None = None,
    ) -> None:
        if (
            not isinstance(out_size, Sequence)
            or len(out_size) != 2
            or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in out_size)
        ):
            raise ValueError(f"img_size must be a positive int or a pair of positive ints, got {out_size!r}")
        if isinstance(slices, bool) or not isinstance(slices, int) or slices < 1:
            raise ValueError(f"slices must be an int >= 1, got {slices!r}")
        s_lo, s_hi = pair(crop_scale, "crop_scale")
        if not 0.0 < s_lo <= s_hi <= 1.0:
            raise ValueError(f"crop_scale must satisfy 0 < low <= high <= 1, got {crop_scale!r}")
        r_lo, r_hi = pair(crop_ratio, "crop_ratio")
        if not (0.0 < r_lo <= r_hi and math.isfinite(r_hi)):
            raise ValueError(f"crop_ratio must satisfy 0 < low <= high, got {crop_ratio!r}")
        if not 0.0 <= number(hflip_prob, "hflip_prob") <= 1.0:
            raise ValueError(f"hflip_prob must be in [0, 1], got {hflip_prob!r}")
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
        if intensity is None:
            intensity = IntensityRule.checked()
        elif not isinstance(intensity, IntensityRule):
            raise ValueError(f"intensity must be an IntensityRule, got {intensity!r}")
        neighbours = SliceNeighbours.centred(slices, slice_spacing_mm, slice_interpolation)
        self.out_size = (int(out_size[0]), int(out_size[1]))
        self.slices = slices
        #: which planes form the channels (index adjacency or millimetre offsets)
        self.neighbours = neighbours
        self.crop_scale = (s_lo, s_hi)
        self.crop_ratio = (r_lo, r_hi)
        self.hflip_prob = float(hflip_prob)
        self.interpolation = interpolation
        self.antialias = bool(antialias)
        #: the intensity and foreground rule (shared with 3D volumes)
        self.intensity = intensity

    # ------------------------------------------------------------------ geometry

    @property
    def out_aspect(self) -> float:
        return self.out_size[1] / self.out_size[0]

    @property
    def channels(self) -> int:
        """Channels per sample: ``slices`` times the number of windows in ``"channels"`` mode."""
        return self.slices * self.intensity.groups

    def pick_planes(self, centre: int, n_slices: int, axis_spacing: float | None = None) -> PlanePick:
        """The planes of a sample centred on ``centre`` (see :class:`~medmae.data.neighbours.SliceNeighbours`).

        ``axis_spacing`` (mm between the series' planes along the axis) is needed only with
        ``slice_spacing_mm``. No randomness is used, so the sample RNG stream does not depend on it.
        """
        return self.neighbours.pick(centre, n_slices, axis_spacing)

    def plan(self, rng: np.random.Generator, plane: tuple[int, int], random_crop: bool) -> tuple[CropBox, bool]:
        """Crop box and flip of one sample: random-resized crop + flip, or the centre crop and no flip."""
        if not random_crop:
            return center_crop_box(plane, self.out_aspect), False
        box = random_resized_crop_box(rng, plane, self.crop_scale, self.crop_ratio, self.out_aspect)
        flip = bool(rng.random() < self.hflip_prob)
        return box, flip

    # ------------------------------------------------------------------ intensity

    def intensity_ranges(self, record: SeriesRecord, rng: np.random.Generator) -> list[tuple[float, float]]:
        """The ``(low, high)`` ranges mapped to [0, 1], one per channel group (:class:`IntensityRule`)."""
        return self.intensity.ranges(record, rng)

    def foreground_threshold(self, record: SeriesRecord) -> float:
        """Stored value above which a pixel counts as foreground (:class:`IntensityRule`)."""
        return self.intensity.foreground_threshold(record)

    def is_foreground(self, slab: np.ndarray, record: SeriesRecord) -> bool:
        """Whether a crop (``(k, h, w)``, storage values) has enough foreground in its centre slice.

        Always true when the filter is off (``foreground_fraction == 0``).
        """
        if self.intensity.foreground_fraction <= 0.0:
            return True
        centre = slab[(slab.shape[0] - 1) // 2]
        return foreground_fraction(centre, self.foreground_threshold(record)) >= self.intensity.foreground_fraction

    # ------------------------------------------------------------------ apply

    def __call__(self, slab: np.ndarray, record: SeriesRecord, rng: np.random.Generator) -> torch.Tensor:
        """Turn a cropped ``(k, h, w)`` slab of stored values into a ``(C, H, W)`` float32 tensor in [0, 1]."""
        values, ranges = self.prepare(slab, record, rng)
        return self.finish(torch.from_numpy(np.ascontiguousarray(values)), ranges)

    def prepare(
        self, slab: np.ndarray, record: SeriesRecord, rng: np.random.Generator
    ) -> tuple[np.ndarray, list[tuple[float, float]]]:
        """The worker's half: the values to resize (storage dtype; NaN/inf zeroed in float arrays) and
        the intensity ranges (one RNG draw). The GPU data path ships exactly this to the device."""
        values = slab
        if record.dtype == "float32":
            values = np.nan_to_num(slab.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
        return values, self.intensity_ranges(record, rng)

    def finish(self, values: torch.Tensor, ranges: Sequence[tuple[float, float]]) -> torch.Tensor:
        """The pixel half, on whatever device ``values`` is: float32 -> resize -> intensity -> clip."""
        image = resize(values.float(), self.out_size, self.interpolation, self.antialias)
        if len(ranges) == 1:
            return scale_intensity(image, *ranges[0])
        return torch.cat([scale_intensity(image, lo, hi) for lo, hi in ranges], dim=0)

    def describe(self) -> dict[str, object]:
        """JSON-able record of every choice made here (for ``CacheDataModule.preprocessing``)."""
        return {
            "image_size": list(self.out_size),
            "slices": self.slices,
            **self.neighbours.describe(),
            "channels": self.channels,
            "channel_layout": (
                "window-major: [window0: slices..., window1: slices..., ...]"
                if self.intensity.groups > 1
                else "slices in increasing array index along the axis"
            ),
            "order": "crop stored values -> float32 -> resize -> intensity -> clip [0, 1]",
            "crop": {
                "train": "random_resized_crop (torchvision get_params, 10 tries, then centre)",
                "scale": list(self.crop_scale),
                "ratio": list(self.crop_ratio),
                "ratio_relative_to_output_aspect": True,
                "val": "centre crop, largest box of the output aspect",
            },
            "hflip_prob": self.hflip_prob,
            "resize": {"interpolation": self.interpolation, "antialias": self.antialias, "align_corners": False},
            **self.intensity.describe("centre slice of the crop, stored values, ~4096-point grid"),
        }
