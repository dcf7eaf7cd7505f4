"""The encoder's input rebuilt from the export card alone: the one preprocessing of fine-tuning and inference.

Pretraining recorded every data choice in the card (``CacheDataModule.preprocessing()``): slicing
axis, plane orientation, which neighbouring slices form the channels (adjacent by index, or
``slice_spacing_mm`` apart with ``nearest``/``linear`` planes: ``medmae.data.neighbours``, the code
training used), output size, resize, and the intensity rule (CT windows in HU, stored percentiles
otherwise). :func:`preprocessing_from_card`
turns that record back into :class:`PlanePreprocessor`, which maps planes of a canonical (Z, Y, X)
volume (the cache's orientation, see ``medmae.data.index``) to encoder input exactly as pretraining
did, so fine-tuning and inference cannot drift from it.

One deliberate difference for dense prediction: pretraining's validation view *centre-cropped* each
plane to the output aspect; here the plane is *padded* to it (with the volume's lowest value, which
maps to 0) so every voxel gets a prediction, and :meth:`PlanePreprocessor.restore` undoes the pad
and resize on the output. For square outputs and square planes both are the identity.

CT windows: when pretraining drew one window per sample (``mode: random``), inference uses the
window ``intensity.ct.inference_window`` names (pretraining's ``ct_inference_window``; cards without
it: the first listed window); in ``channels`` mode every window is a channel.

Slice spacing: with ``slice_spacing_mm`` in the card, :meth:`PlanePreprocessor.planes` needs the
volume's (Z, Y, X) spacing in mm (``Volume.spacing``, a cache record's ``spacing``). Cards without the
field keep index adjacency. A volume coarser than ``slice_spacing_mm`` along the axis (pretraining
never used one) is still processed by the same rule, with a warning.

Example::

    pre = preprocessing_from_card(load_card("encoder/"))
    x = pre.planes(volume_zyx, intensity="raw", stats=compute_stats(volume_zyx), spacing=(2.5, 0.7, 0.7))
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from medmae.data.cache import KINDS
from medmae.data.index import AXES
from medmae.data.neighbours import SliceNeighbours, fits_slice_spacing
from medmae.data.reader import plane_view
from medmae.data.transforms import resize, scale_intensity
from medmae.export.card import CARD_FIELDS, CardError, check_plane_values
from medmae.export.card_fields import card_field, inference_ranges, intensity_from_card
from medmae.export.volume_preprocessing import VolumePreprocessor, volume_preprocessing_from_card

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PadBox:
    """How a plane of ``(height, width)`` was padded to the output aspect: rows/cols added before."""

    height: int
    width: int
    top: int
    left: int
    padded: tuple[int, int]


@dataclass(frozen=True)
class PlanePreprocessor:
    """Planes of a canonical volume -> encoder input ``(C, H, W)`` in [0, 1], as in pretraining.

    ``slice_spacing_mm`` / ``slice_interpolation`` place the channels in millimetres (``None``: index
    adjacency, what cards without the field mean).
    """

    axis: str
    image_size: tuple[int, int]
    slice_offsets: tuple[int, ...]
    interpolation: str
    antialias: bool
    ct_windows: tuple[tuple[float, float], ...]
    ct_window_mode: str
    inference_window: int
    percentiles: tuple[float, float]
    slice_spacing_mm: float | None = None
    slice_interpolation: str = "nearest"

    spatial_dims = 2  # a class attribute, not a field (VolumePreprocessor has 3)

    @property
    def neighbours(self) -> SliceNeighbours:
        """The channel-placement rule of pretraining (the same code the training dataset runs)."""
        return SliceNeighbours(self.slice_offsets, self.slice_spacing_mm, self.slice_interpolation)

    @property
    def channels(self) -> int:
        per_slice = len(self.ct_windows) if self.ct_window_mode == "channels" else 1
        return len(self.slice_offsets) * per_slice

    # ------------------------------------------------------------------ intensity

    def intensity_ranges(self, intensity: str, stats: Mapping[str, float]) -> list[tuple[float, float]]:
        """``(low, high)`` mapped to [0, 1], one per channel group: CT windows for HU, percentiles otherwise."""
        return inference_ranges(
            self.ct_windows, self.ct_window_mode, self.inference_window, self.percentiles, intensity, stats
        )

    # ------------------------------------------------------------------ geometry

    def stack(self, volume: np.ndarray, kind: str = "volume") -> np.ndarray:
        """View a canonical (Z, Y, X) array as its planes along the card's axis (no copy).

        ``kind`` is the cache's: an ``image`` (one 2D picture, Z == 1) is its one (Y, X) plane under
        every axis, as pretraining read it (:func:`medmae.data.reader.plane_view`).
        """
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if kind == "image" and np.shape(volume)[0] != 1:
            raise ValueError(f"an image (kind 'image') has one plane, got shape {tuple(np.shape(volume))}")
        return plane_view(np.asarray(volume), kind, self.axis)

    def pad_box(self, plane_shape: tuple[int, int]) -> PadBox:
        """Symmetric padding that gives a plane the output aspect (width / height)."""
        h, w = int(plane_shape[0]), int(plane_shape[1])
        aspect = self.image_size[1] / self.image_size[0]
        if w / h > aspect:
            ph, pw = int(math.ceil(w / aspect)), w
        else:
            ph, pw = h, int(math.ceil(h * aspect))
        return PadBox(h, w, (ph - h) // 2, (pw - w) // 2, (ph, pw))

    def axis_spacing(self, spacing: Sequence[float] | None) -> float | None:
        """Millimetres between planes along the card's axis, from a (Z, Y, X) spacing; ``ValueError``
        when the card places channels in millimetres and no spacing is given."""
        rule = self.neighbours
        if not rule.by_distance:
            return None
        if spacing is None or len(spacing) != 3:
            raise ValueError(
                f"the card places 2.5D channels slice_spacing_mm={self.slice_spacing_mm} mm apart: pass the "
                f"volume's (Z, Y, X) spacing in mm (got {spacing!r})"
            )
        d = float(spacing[AXES[self.axis]])
        if not fits_slice_spacing(d, self.slice_spacing_mm):
            logger.warning(
                "volume spacing %.4g mm along the %s axis is coarser than the card's slice_spacing_mm=%g: "
                "pretraining never saw such series; its neighbours are %s",
                d,
                self.axis,
                self.slice_spacing_mm,
                "interpolated" if self.slice_interpolation == "linear" else "the nearest planes",
            )
        return d

    # ------------------------------------------------------------------ apply

    def planes(
        self,
        volume: np.ndarray,
        intensity: str,
        stats: Mapping[str, float],
        indices: Sequence[int] | None = None,
        *,
        spacing: Sequence[float] | None = None,
        kind: str = "volume",
    ) -> torch.Tensor:
        """Encoder input for planes ``indices`` (default all) of a canonical volume: ``(N, C, H, W)``.

        ``spacing``: the volume's (Z, Y, X) voxel spacing in mm; required when the card has
        ``slice_spacing_mm`` (channels placed in millimetres), unused otherwise and for images.
        ``kind``: ``image`` for one 2D picture (one plane whatever the axis; 2.5D channels repeat it).
        """
        stack = self.stack(volume, kind)
        n = stack.shape[0]
        indices = range(n) if indices is None else indices
        ranges = self.intensity_ranges(intensity, stats)
        fill = float(stats["min"])
        if kind == "image":  # no through-plane geometry: every channel is the one plane
            rule, d = SliceNeighbours(self.slice_offsets), None
        else:
            rule, d = self.neighbours, self.axis_spacing(spacing)
        out = []
        for centre in indices:
            pick = rule.pick(int(centre), n, d)
            slab = np.asarray(pick.channels(stack[pick.indices]), dtype=np.float32)
            out.append(self._image(slab, ranges, fill))
        return torch.stack(out) if out else torch.empty(0, self.channels, *self.image_size)

    def _image(self, slab: np.ndarray, ranges: list[tuple[float, float]], fill: float) -> torch.Tensor:
        box = self.pad_box(slab.shape[-2:])
        t = torch.from_numpy(np.nan_to_num(slab, nan=fill, posinf=fill, neginf=fill))
        pad = (box.left, box.padded[1] - box.width - box.left, box.top, box.padded[0] - box.height - box.top)
        t = F.pad(t, pad, value=fill)
        t = resize(t, self.image_size, self.interpolation, self.antialias)
        if len(ranges) == 1:
            return scale_intensity(t, *ranges[0])
        return torch.cat([scale_intensity(t.clone(), lo, hi) for lo, hi in ranges], dim=0)

    def labels(
        self, label_volume: np.ndarray, indices: Sequence[int] | None = None, kind: str = "volume"
    ) -> torch.Tensor:
        """Label planes on the encoder grid (pad with 0 = background, nearest resize): ``(N, H, W)`` int64."""
        stack = self.stack(label_volume, kind)
        indices = range(stack.shape[0]) if indices is None else indices
        out = []
        for i in indices:
            plane = torch.from_numpy(np.ascontiguousarray(stack[int(i)]).astype(np.int64))
            box = self.pad_box(plane.shape)
            pad = (box.left, box.padded[1] - box.width - box.left, box.top, box.padded[0] - box.height - box.top)
            plane = F.pad(plane, pad, value=0)
            plane = F.interpolate(plane[None, None].float(), size=self.image_size, mode="nearest-exact")[0, 0]
            out.append(plane.long())
        return torch.stack(out) if out else torch.empty(0, *self.image_size, dtype=torch.long)

    def restore(self, output: torch.Tensor, plane_shape: tuple[int, int]) -> torch.Tensor:
        """Undo pad + resize on a ``(N, K, H, W)`` float output (e.g. logits): ``(N, K, h, w)`` of the plane."""
        box = self.pad_box(plane_shape)
        up = F.interpolate(output.float(), size=box.padded, mode="bilinear", align_corners=False)
        return up[..., box.top : box.top + box.height, box.left : box.left + box.width]


def preprocessing_from_card(card: Mapping[str, Any], where: str = "card") -> PlanePreprocessor | VolumePreprocessor:
    """Rebuild the pretraining preprocessing from a card (as returned by :func:`load_card`).

    2D / 2.5D cards (no ``preprocessing.spatial_dims``, or 2) give a :class:`PlanePreprocessor`; 3D
    cards (``spatial_dims: 3``) a :class:`~medmae.export.volume_preprocessing.VolumePreprocessor`.
    Raises :class:`CardError` naming ``where`` (the card's file) and the field when the record is
    missing or malformed.
    """
    pre = card.get("preprocessing")
    if not isinstance(pre, Mapping) or not pre:
        raise CardError(f"{where}: field 'preprocessing' is missing or empty (the encoder was exported without data)")
    dims = pre.get("spatial_dims", 2)
    if isinstance(dims, bool) or dims not in (2, 3):
        raise CardError(f"{where}: field 'preprocessing.spatial_dims' must be 2 or 3, got {dims!r}")
    if dims == 3:
        return volume_preprocessing_from_card(pre, where)
    return plane_preprocessing_from_card(pre, where)


def plane_preprocessing_from_card(pre: Mapping[str, Any], where: str = "card") -> PlanePreprocessor:
    """The 2D / 2.5D half of :func:`preprocessing_from_card` (``pre``: the card's ``preprocessing``).

    Every value is checked and bounded by :func:`medmae.export.card.check_plane_values` (the one
    validator; fine-tuning checkpoint records go through it too)."""
    values = {
        "axis": card_field(pre, "axis", where),
        "image_size": card_field(pre, "image_size", where),
        "slice_offsets": card_field(pre, "slice_offsets", where),
        "interpolation": card_field(pre, "resize.interpolation", where),
        "antialias": pre["resize"].get("antialias", True),
        "slice_spacing_mm": pre.get("slice_spacing_mm"),  # absent (older cards) or null: index adjacency
        "slice_interpolation": pre.get("slice_interpolation", "nearest"),
    }
    values.update(intensity_from_card(pre, where))
    return PlanePreprocessor(**check_plane_values(values, where, CARD_FIELDS))
