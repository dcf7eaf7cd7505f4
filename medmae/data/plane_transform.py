"""The plane (2D / 2.5D) input transform of fine-tuning and inference: pretraining's slices, invertible.

:class:`PlanePreprocessor` maps planes of a canonical (Z, Y, X) array (the cache's orientation, see
``medmae.data.index``) to encoder input exactly as pretraining did, from the fields pretraining
recorded (``CacheDataModule.preprocessing()``, which the export card keeps verbatim; built by
:func:`medmae.data.transform_record.build_transform`): slicing axis, plane orientation, which
neighbouring slices form the channels (adjacent by index, or ``slice_spacing_mm`` apart with
``nearest``/``linear`` planes: :class:`~medmae.data.neighbours.SliceNeighbours`, the code training
used), output size, resize, and the intensity rule (:class:`~medmae.data.intensity.IntensityRule`:
CT windows in HU, stored percentiles otherwise).

Three directions: :meth:`~PlanePreprocessor.forward` (image -> encoder input), :meth:`~PlanePreprocessor.labels`
(label map -> the same grid) and :meth:`~PlanePreprocessor.restore` (an output on the encoder grid -> the plane).

The input's ``kind`` (the cache's: ``volume``, or ``image`` for one 2D picture such as a CR/DX/MG) is
carried by the transform: :meth:`~PlanePreprocessor.for_input` gives the transform of one input, and
every view of it (``stack``, ``forward``, ``labels``) then reads the input as pretraining did. An image
is its one (Y, X) plane under every axis (a CR under a coronal card is not cut into 1-row strips).

One deliberate difference for dense prediction: pretraining's validation view *centre-cropped* each
plane to the output aspect; here the plane is *padded* to it (with the volume's lowest value, which
maps to 0) so every voxel gets a prediction, and :meth:`PlanePreprocessor.restore` undoes the pad
and resize on the output. For square outputs and square planes both are the identity.

CT windows: when pretraining drew one window per sample (``mode: random``), inference uses the
window ``intensity.ct.inference_window`` names (pretraining's ``ct_inference_window``; cards without
it: the first listed window); in ``channels`` mode every window is a channel.

Slice spacing: with ``slice_spacing_mm`` in the record, :meth:`PlanePreprocessor.forward` needs the
volume's (Z, Y, X) spacing in mm (``Volume.spacing``, a cache record's ``spacing``). Records without the
field keep index adjacency. A volume coarser than ``slice_spacing_mm`` along the axis (pretraining
never used one) is still processed by the same rule, with a warning.

Example::

    pre = build_transform(load_card("encoder/")).for_input(volume.kind)
    x = pre.forward(volume_zyx, intensity="raw", stats=compute_stats(volume_zyx), spacing=(2.5, 0.7, 0.7))
"""

from __future__ import annotations

import dataclasses
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
from medmae.data.intensity import IntensityRule
from medmae.data.neighbours import SliceNeighbours, fits_slice_spacing
from medmae.data.reader import plane_view
from medmae.data.transforms import resize, scale_intensity

logger = logging.getLogger(__name__)


def check_kind(kind: str) -> str:
    """``kind`` if it is one of the cache's (``volume``, ``image``); ValueError otherwise."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    return kind


def intensity_rule(pre: Any) -> IntensityRule:
    """Pretraining's intensity rule of a transform's four intensity fields (2D and 3D share them)."""
    return IntensityRule(
        tuple((float(lv), float(wd)) for lv, wd in pre.ct_windows),
        pre.ct_window_mode,
        int(pre.inference_window),
        (float(pre.percentiles[0]), float(pre.percentiles[1])),
    )


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
    adjacency, what records without the field mean). ``kind`` is the input's (see :meth:`for_input`);
    it is not part of the record (:meth:`settings`).
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
    kind: str = "volume"

    spatial_dims = 2  # class attributes, not fields (VolumePreprocessor has 3)
    size_field = "preprocessing.image_size"

    def __post_init__(self) -> None:
        check_kind(self.kind)

    def for_input(self, kind: str) -> PlanePreprocessor:
        """This transform for one input of ``kind`` (``volume`` or ``image``, the cache's / ``Volume.kind``)."""
        return self if kind == self.kind else dataclasses.replace(self, kind=check_kind(kind))

    def settings(self) -> dict[str, Any]:
        """The fields that describe the encoder input (every field but the input's ``kind``)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "kind"}

    @property
    def input_size(self) -> tuple[int, int]:
        """The encoder input's spatial size (``image_size``)."""
        return self.image_size

    @property
    def neighbours(self) -> SliceNeighbours:
        """The channel-placement rule of pretraining (the same code the training dataset runs)."""
        return SliceNeighbours(self.slice_offsets, self.slice_spacing_mm, self.slice_interpolation)

    @property
    def intensity(self) -> IntensityRule:
        """The intensity rule of pretraining (the same code the training dataset runs)."""
        return intensity_rule(self)

    @property
    def channels(self) -> int:
        return len(self.slice_offsets) * self.intensity.groups

    # ------------------------------------------------------------------ intensity

    def intensity_ranges(self, intensity: str, stats: Mapping[str, float]) -> list[tuple[float, float]]:
        """``(low, high)`` mapped to [0, 1], one per channel group: CT windows for HU, percentiles otherwise."""
        return self.intensity.inference_ranges(intensity, stats)

    # ------------------------------------------------------------------ geometry

    def stack(self, volume: np.ndarray, kind: str | None = None) -> np.ndarray:
        """View a canonical (Z, Y, X) array as its planes along the card's axis (no copy).

        ``kind`` (default: the transform's, see :meth:`for_input`) is the cache's: an ``image`` (one 2D
        picture, Z == 1) is its one (Y, X) plane under every axis, as pretraining read it
        (:func:`medmae.data.reader.plane_view`).
        """
        kind = self.kind if kind is None else check_kind(kind)
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

    # ------------------------------------------------------------------ forward, labels, restore

    def forward(
        self,
        volume: np.ndarray,
        intensity: str,
        stats: Mapping[str, float],
        indices: Sequence[int] | None = None,
        *,
        spacing: Sequence[float] | None = None,
        kind: str | None = None,
    ) -> torch.Tensor:
        """Encoder input for planes ``indices`` (default all) of a canonical volume: ``(N, C, H, W)``.

        ``spacing``: the volume's (Z, Y, X) voxel spacing in mm; required when the card has
        ``slice_spacing_mm`` (channels placed in millimetres), unused otherwise and for images.
        ``kind`` (default: the transform's): ``image`` for one 2D picture (one plane whatever the axis;
        2.5D channels repeat it).
        """
        kind = self.kind if kind is None else check_kind(kind)
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

    planes = forward  # the name fine-tuning code and cards' users know

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
        self, label_volume: np.ndarray, indices: Sequence[int] | None = None, kind: str | None = None
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
