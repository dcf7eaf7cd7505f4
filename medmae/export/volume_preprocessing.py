"""The 3D encoder's input rebuilt from the export card alone: whole volumes at the pretraining spacing.

A 3D card's ``preprocessing`` is ``VolumeTransform.describe()`` (``spatial_dims: 3``): the output grid
``volume.size`` in voxels at ``volume.spacing_mm``, canonical (Z, Y, X) axes, and the intensity rule
shared with 2D. :func:`preprocessing_from_card` turns it into :class:`VolumePreprocessor`, which maps a
canonical (Z, Y, X) volume (what ``medmae.finetune.volumes`` reads from NIfTI / DICOM / the cache) to
encoder input with the code pretraining ran (``medmae.data.volume``), in pretraining's order::

    stored values -> float32 -> intensity (linear, one range per channel) -> resample -> clip [0, 1]

Pretraining's validation view is the centred crop of ``size`` at exactly ``spacing_mm``; fine-tuning
and inference instead resample the *whole* series to ``spacing_mm`` (:func:`medmae.data.volume.resample_volume`,
the same linear rule and voxel-centre coordinates) and cover it with sliding windows of ``size``
(MONAI ``sliding_window_inference``), so every voxel gets a prediction. Where the centred crop and the
whole-volume grid share voxels they hold the same numbers (tested). :meth:`VolumePreprocessor.restore`
brings outputs back onto the series' own grid (:func:`medmae.data.volume.restore_volume`).

Labels go onto the same grid by nearest neighbour (:func:`medmae.data.volume.resample_labels`: the nearest source voxel
to each output voxel centre, same coordinates as the image).

CT windows: as in 2D (:func:`medmae.export.card_fields.inference_ranges`): the window
``intensity.ct.inference_window`` in ``random`` mode, every window as a channel in ``channels`` mode.

Example::

    pre = preprocessing_from_card(load_card("encoder3d/"))
    x = pre.image(volume_zyx, intensity="HU", stats=stats, spacing=(2.5, 0.7, 0.7))   # (C, z, y, x)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from medmae.data.volume import resample_labels, resample_volume, restore_volume
from medmae.export.card import CARD_FIELDS, CardError, check_volume_values
from medmae.export.card_fields import card_field, inference_ranges, intensity_from_card

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

    spatial_dims = 3  # a class attribute, not a field: 2D preprocessors have none (their cards neither)

    @property
    def channels(self) -> int:
        return len(self.ct_windows) if self.ct_window_mode == "channels" else 1

    def intensity_ranges(self, intensity: str, stats: Mapping[str, float]) -> list[tuple[float, float]]:
        """``(low, high)`` mapped to [0, 1], one per channel: CT window(s) for HU, percentiles otherwise."""
        return inference_ranges(
            self.ct_windows, self.ct_window_mode, self.inference_window, self.percentiles, intensity, stats
        )

    def image(
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

    def labels(self, label_volume: np.ndarray, spacing: Sequence[float]) -> torch.Tensor:
        """A label map on the :meth:`image` grid (nearest neighbour): ``(z, y, x)`` int64."""
        return resample_labels(label_volume, check_spacing(spacing), self.spacing_mm)

    def restore(self, output: torch.Tensor, shape: Sequence[int], spacing: Sequence[float]) -> torch.Tensor:
        """A ``(K, z, y, x)`` float output on the :meth:`image` grid back onto the series' ``(Z, Y, X)`` grid
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


def volume_preprocessing_from_card(pre: Mapping[str, Any], where: str = "card") -> VolumePreprocessor:
    """The 3D half of :func:`~medmae.export.preprocessing.preprocessing_from_card` (``pre``: the card's
    ``preprocessing`` section, ``spatial_dims: 3``); :class:`CardError` names the field. Values are
    checked and bounded by :func:`medmae.export.card.check_volume_values` (the one validator)."""
    values = {"size": card_field(pre, "volume.size", where), "spacing_mm": card_field(pre, "volume.spacing_mm", where)}
    values.update(intensity_from_card(pre, where))
    out = VolumePreprocessor(**check_volume_values(values, where, CARD_FIELDS))
    channels = pre.get("channels", out.channels)
    if channels != out.channels or isinstance(channels, bool):
        raise CardError(
            f"{where}: field 'preprocessing.channels' is {channels!r} but the intensity section gives {out.channels}"
        )
    return out
