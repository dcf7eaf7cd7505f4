"""The encoder's input rebuilt from the export card alone: the one preprocessing of fine-tuning and inference.

Pretraining recorded every data choice in the card (``CacheDataModule.preprocessing()``): slicing
axis, plane orientation, which neighbouring slices form the channels, output size, resize, and the
intensity rule (CT windows in HU, stored percentiles otherwise). :func:`preprocessing_from_card`
turns that record back into :class:`PlanePreprocessor`, which maps planes of a canonical (Z, Y, X)
volume (the cache's orientation, see ``medmae.data.index``) to encoder input exactly as pretraining
did, so fine-tuning and inference cannot drift from it.

One deliberate difference for dense prediction: pretraining's validation view *centre-cropped* each
plane to the output aspect; here the plane is *padded* to it (with the volume's lowest value, which
maps to 0) so every voxel gets a prediction, and :meth:`PlanePreprocessor.restore` undoes the pad
and resize on the output. For square outputs and square planes both are the identity.

CT windows: when pretraining drew one window per sample (``mode: random``), inference uses the
first listed window (``inference_window``); in ``channels`` mode every window is a channel.

Example::

    pre = preprocessing_from_card(load_card("encoder/"))
    x = pre.planes(volume_zyx, intensity="raw", stats=compute_stats(volume_zyx))   # (Z, C, H, W)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from medmae.data.cache import PERCENTILES
from medmae.data.index import AXES
from medmae.data.reader import plane_view
from medmae.data.transforms import INTERPOLATIONS, resize, scale_intensity, window_range
from medmae.export.card import CardError


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
    """Planes of a canonical volume -> encoder input ``(C, H, W)`` in [0, 1], as in pretraining."""

    axis: str
    image_size: tuple[int, int]
    slice_offsets: tuple[int, ...]
    interpolation: str
    antialias: bool
    ct_windows: tuple[tuple[float, float], ...]
    ct_window_mode: str
    inference_window: int
    percentiles: tuple[float, float]

    @property
    def channels(self) -> int:
        per_slice = len(self.ct_windows) if self.ct_window_mode == "channels" else 1
        return len(self.slice_offsets) * per_slice

    # ------------------------------------------------------------------ intensity

    def intensity_ranges(self, intensity: str, stats: Mapping[str, float]) -> list[tuple[float, float]]:
        """``(low, high)`` mapped to [0, 1], one per channel group: CT windows for HU, percentiles otherwise."""
        n_groups = len(self.ct_windows) if self.ct_window_mode == "channels" else 1
        if intensity == "HU":
            if self.ct_window_mode == "channels":
                return [window_range(*w) for w in self.ct_windows]
            return [window_range(*self.ct_windows[self.inference_window])]
        lo = float(stats[f"p{self.percentiles[0]:g}"])
        hi = float(stats[f"p{self.percentiles[1]:g}"])
        if not hi > lo:
            hi = lo + 1.0
        return [(lo, hi)] * n_groups

    # ------------------------------------------------------------------ geometry

    def stack(self, volume: np.ndarray) -> np.ndarray:
        """View a canonical (Z, Y, X) volume as its planes along the card's axis (no copy)."""
        return plane_view(np.asarray(volume), "volume", self.axis)

    def pad_box(self, plane_shape: tuple[int, int]) -> PadBox:
        """Symmetric padding that gives a plane the output aspect (width / height)."""
        h, w = int(plane_shape[0]), int(plane_shape[1])
        aspect = self.image_size[1] / self.image_size[0]
        if w / h > aspect:
            ph, pw = int(math.ceil(w / aspect)), w
        else:
            ph, pw = h, int(math.ceil(h * aspect))
        return PadBox(h, w, (ph - h) // 2, (pw - w) // 2, (ph, pw))

    def slice_indices(self, centre: int, n_slices: int) -> np.ndarray:
        """Planes of the sample centred on ``centre`` (edge planes repeated, as in pretraining)."""
        return np.clip(centre + np.asarray(self.slice_offsets, dtype=np.int64), 0, n_slices - 1)

    # ------------------------------------------------------------------ apply

    def planes(
        self,
        volume: np.ndarray,
        intensity: str,
        stats: Mapping[str, float],
        indices: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """Encoder input for planes ``indices`` (default all) of a canonical volume: ``(N, C, H, W)``."""
        stack = self.stack(volume)
        n = stack.shape[0]
        indices = range(n) if indices is None else indices
        ranges = self.intensity_ranges(intensity, stats)
        fill = float(stats["min"])
        out = []
        for centre in indices:
            slab = np.asarray(stack[self.slice_indices(int(centre), n)], dtype=np.float32)
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

    def labels(self, label_volume: np.ndarray, indices: Sequence[int] | None = None) -> torch.Tensor:
        """Label planes on the encoder grid (pad with 0 = background, nearest resize): ``(N, H, W)`` int64."""
        stack = self.stack(label_volume)
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


def _field(d: Mapping[str, Any], path: str, where: str) -> Any:
    node: Any = d
    for part in path.split("."):
        if not isinstance(node, Mapping) or part not in node:
            raise CardError(f"{where}: field 'preprocessing.{path}' is missing")
        node = node[part]
    return node


def preprocessing_from_card(card: Mapping[str, Any], where: str = "card") -> PlanePreprocessor:
    """Rebuild the pretraining preprocessing from a card (as returned by :func:`load_card`).

    Raises :class:`CardError` naming ``where`` (the card's file) and the field when the record is
    missing or malformed.
    """
    pre = card.get("preprocessing")
    if not isinstance(pre, Mapping) or not pre:
        raise CardError(f"{where}: field 'preprocessing' is missing or empty (the encoder was exported without data)")
    axis = _field(pre, "axis", where)
    if axis not in AXES:
        raise CardError(f"{where}: field 'preprocessing.axis' must be one of {tuple(AXES)}, got {axis!r}")
    size = _field(pre, "image_size", where)
    if not isinstance(size, list) or len(size) != 2 or not all(isinstance(s, int) and s > 0 for s in size):
        raise CardError(f"{where}: field 'preprocessing.image_size' must be [height, width], got {size!r}")
    offsets = _field(pre, "slice_offsets", where)
    if not isinstance(offsets, list) or not offsets or not all(isinstance(o, int) for o in offsets):
        raise CardError(f"{where}: field 'preprocessing.slice_offsets' must be a list of ints, got {offsets!r}")
    interp = _field(pre, "resize.interpolation", where)
    if interp not in INTERPOLATIONS:
        raise CardError(f"{where}: field 'preprocessing.resize.interpolation' must be one of {INTERPOLATIONS}")
    windows = _field(pre, "intensity.ct.windows_level_width", where)
    try:
        ct_windows = tuple((float(lv), float(wd)) for lv, wd in windows)
    except (TypeError, ValueError):
        raise CardError(
            f"{where}: field 'preprocessing.intensity.ct.windows_level_width' is malformed: {windows!r}"
        ) from None
    if not ct_windows or any(not wd > 0 for _, wd in ct_windows):
        raise CardError(f"{where}: field 'preprocessing.intensity.ct.windows_level_width' needs windows of width > 0")
    mode = _field(pre, "intensity.ct.mode", where)
    if mode not in ("random", "channels"):
        raise CardError(f"{where}: field 'preprocessing.intensity.ct.mode' must be random or channels, got {mode!r}")
    inference_window = pre["intensity"]["ct"].get("inference_window", 0)
    if not isinstance(inference_window, int) or not 0 <= inference_window < len(ct_windows):
        raise CardError(
            f"{where}: field 'preprocessing.intensity.ct.inference_window' is out of range: {inference_window!r}"
        )
    pcts = _field(pre, "intensity.other.percentiles", where)
    if not isinstance(pcts, list) or len(pcts) != 2 or any(p not in PERCENTILES for p in pcts) or not pcts[0] < pcts[1]:
        raise CardError(f"{where}: field 'preprocessing.intensity.other.percentiles' must be two of {PERCENTILES}")
    antialias = bool(pre["resize"].get("antialias", True))
    return PlanePreprocessor(
        axis=axis,
        image_size=(size[0], size[1]),
        slice_offsets=tuple(offsets),
        interpolation=interp,
        antialias=antialias,
        ct_windows=ct_windows,
        ct_window_mode=mode,
        inference_window=inference_window,
        percentiles=(float(pcts[0]), float(pcts[1])),
    )
