"""The volume (3D) input transform of fine-tuning and inference: whole volumes at the pretraining spacing.

A 3D record (``CacheDataModule.preprocessing()`` of a ``data.volume`` run, kept verbatim by the export
card) is ``VolumeTransform.describe()`` (``spatial_dims: 3``): the output grid ``volume.size`` in voxels
at ``volume.spacing_mm``, canonical (Z, Y, X) axes, and the intensity rule shared with 2D.
:func:`medmae.data.transform_record.build_transform` turns it into :class:`VolumePreprocessor`, which
maps a canonical (Z, Y, X) volume (what ``medmae.finetune.volumes`` reads from NIfTI / DICOM / the
cache) to encoder input with the code pretraining ran (``medmae.data.volume``), in pretraining's order::

    stored values -> float32 -> intensity (linear, one range per channel) -> resample -> clip [0, 1]

Pretraining's validation view is the centred crop of ``size`` at exactly ``spacing_mm``; fine-tuning
and inference instead resample the *whole* series to ``spacing_mm`` (:func:`medmae.data.volume.resample_volume`,
the same linear rule and voxel-centre coordinates) and cover it with sliding windows of ``size``
(MONAI ``sliding_window_inference``), so every voxel gets a prediction. Where the centred crop and the
whole-volume grid share voxels they hold the same numbers (tested). :meth:`VolumePreprocessor.restore`
brings outputs back onto the series' own grid (:func:`medmae.data.volume.restore_volume`).

Labels go onto the same grid by nearest neighbour (:func:`medmae.data.volume.resample_labels`: the nearest source voxel
to each output voxel centre, same coordinates as the image).

CT windows: as in 2D (:meth:`medmae.data.intensity.IntensityRule.inference_ranges`): the window
``intensity.ct.inference_window`` in ``random`` mode, every window as a channel in ``channels`` mode.

The input's ``kind`` is carried as in 2D (:meth:`VolumePreprocessor.for_input`); a single 2D image
(kind ``image``) is refused, as 3D pretraining dropped it.

Example::

    pre = build_transform(load_card("encoder3d/"))
    x = pre.forward(volume_zyx, intensity="HU", stats=stats, spacing=(2.5, 0.7, 0.7))   # (C, z, y, x)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from medmae.data.intensity import IntensityRule
from medmae.data.plane_transform import check_kind, intensity_rule
from medmae.data.volume import resample_labels, resample_volume, restore_volume

Triple = tuple[float, float, float]


def check_spacing(spacing: Sequence[float] | None, what: str = "volume spacing") -> Triple:
    """Three finite positive (Z, Y, X) spacings in mm; ValueError otherwise."""
    try:
        z, y, x = (float(s) for s in spacing)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be three numbers (Z, Y, X) in mm, got {spacing!r}") from None
    if not all(math.isfinite(s) and s > 0 for s in (z, y, x)):
        raise ValueError(f"{what} must be finite and > 0 mm along every axis, got {spacing!r}")
    return z, y, x


@dataclass(frozen=True)
class VolumePreprocessor:
    """Canonical (Z, Y, X) volumes -> encoder input ``(C, z, y, x)`` in [0, 1] at ``spacing_mm``, as in pretraining.

    ``size`` is the pretraining crop (the sliding-window size); the whole volume is resampled, not cropped.
    """

    size: tuple[int, int, int]
    spacing_mm: Triple
    ct_windows: tuple[tuple[float, float], ...]
    ct_window_mode: str
    inference_window: int
    percentiles: tuple[float, float]
    kind: str = "volume"

    spatial_dims = 3  # class attributes, not fields: 2D transforms have 2 (their records no spatial_dims)
    size_field = "preprocessing.volume.size"

    def __post_init__(self) -> None:
        if check_kind(self.kind) != "volume":
            raise ValueError(f"a single 2D image (kind {self.kind}) cannot feed a 3D encoder")

    def for_input(self, kind: str) -> VolumePreprocessor:
        """This transform for one input of ``kind``: only ``volume`` (ValueError for an ``image``)."""
        return self if kind == self.kind else dataclasses.replace(self, kind=kind)

    def settings(self) -> dict[str, Any]:
        """The fields that describe the encoder input (every field but the input's ``kind``)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "kind"}

    @property
    def input_size(self) -> tuple[int, int, int]:
        """The encoder input's spatial size (the sliding window, ``size``)."""
        return self.size

    @property
    def intensity(self) -> IntensityRule:
        """The intensity rule of pretraining (the same code the training dataset runs)."""
        return intensity_rule(self)

    @property
    def channels(self) -> int:
        return self.intensity.groups

    def intensity_ranges(self, intensity: str, stats: Mapping[str, float]) -> list[tuple[float, float]]:
        """``(low, high)`` mapped to [0, 1], one per channel: CT window(s) for HU, percentiles otherwise."""
        return self.intensity.inference_ranges(intensity, stats)

    def forward(
        self, volume: np.ndarray, intensity: str, stats: Mapping[str, float], spacing: Sequence[float]
    ) -> torch.Tensor:
        """The whole volume as encoder input: ``(C, z, y, x)`` float32 in [0, 1] on the ``spacing_mm`` grid.

        ``spacing``: the volume's (Z, Y, X) voxel spacing in mm (``Volume.spacing``, a cache record's).
        """
        spacing = check_spacing(spacing)
        values = torch.from_numpy(np.asarray(volume, dtype=np.float32))
        if values.ndim != 3:
            raise ValueError(f"expected a canonical (Z, Y, X) volume, got shape {tuple(values.shape)}")
        values = torch.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
        mapped = torch.stack([(values - lo) / (hi - lo) for lo, hi in self.intensity_ranges(intensity, stats)])
        return resample_volume(mapped, spacing, self.spacing_mm).clamp_(0.0, 1.0).float().contiguous()

    image = forward  # the name fine-tuning code and cards' users know

    def labels(self, label_volume: np.ndarray, spacing: Sequence[float]) -> torch.Tensor:
        """A label map on the :meth:`forward` grid (nearest neighbour): ``(z, y, x)`` int64."""
        return resample_labels(label_volume, check_spacing(spacing), self.spacing_mm)

    def restore(self, output: torch.Tensor, shape: Sequence[int], spacing: Sequence[float]) -> torch.Tensor:
        """A ``(K, z, y, x)`` float output on the :meth:`forward` grid back onto the series' ``(Z, Y, X)`` grid
        (linear, for logits or probabilities): ``(K, Z, Y, X)``."""
        return restore_volume(output.float(), shape, check_spacing(spacing), self.spacing_mm)

    def restore_argmax(self, output: torch.Tensor, shape: Sequence[int], spacing: Sequence[float]) -> torch.Tensor:
        """The class map of ``(K, z, y, x)`` logits on the series' grid, ``(Z, Y, X)`` uint8.

        Equal to ``restore(output).argmax(0)``, one class at a time (memory of two volumes, not ``K``).
        """
        spacing = check_spacing(spacing)
        best = labels = None
        for k in range(output.shape[0]):
            up = restore_volume(output[k : k + 1].float(), shape, spacing, self.spacing_mm)[0]
            if best is None:
                best, labels = up, torch.zeros(up.shape, dtype=torch.uint8)
                continue
            better = up > best
            best = torch.where(better, up, best)
            labels[better] = k  # type: ignore[index]
        assert labels is not None
        return labels
