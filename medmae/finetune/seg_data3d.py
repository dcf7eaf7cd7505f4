"""Labelled volumes -> random 3D patches for fine-tuning a 3D encoder (UNETR 3D).

Cases are read exactly as for 2D (:mod:`medmae.finetune.seg_data`: CSV or folder, per-patient
splits, labels checked against the image's geometry by :func:`~medmae.finetune.volumes.read_label`).
Each volume goes through the card's :class:`~medmae.data.volume_transform.VolumePreprocessor`
once at setup: the whole series resampled to the pretraining ``spacing_mm`` (labels by nearest
neighbour onto the same grid). Training samples are patches of the card's ``size`` from that grid:

* position: with probability ``foreground_prob`` the patch holds a random labelled voxel at a
  uniform place inside it; otherwise it is uniform over the volume (a volume smaller than the patch
  is padded with 0, which is what the intensity map gives the range's low end, and background);
* ``crop_scale``: a patch of ``s**(1/3) * size`` voxels (``s`` uniform in the range, the volume
  fraction as in 2D's area fraction) resized to ``size`` (trilinear image, nearest labels): 1 keeps
  exactly ``spacing_mm``;
* ``hflip_prob``: a left-right flip (along X, patient right -> left), image and label together.

A sample is a pure function of (seed, epoch, index). Validation keeps whole volumes: the resampled
image, and the labels on the series' own grid (scored there after ``restore``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from medmae.data.volume_transform import VolumePreprocessor
from medmae.finetune.samples import EpochDataset
from medmae.finetune.volumes import Volume, VolumeError, read_image, read_label

#: most labelled voxels kept per case to place foreground patches (a regular subsample)
MAX_FOREGROUND_POINTS = 200_000


@dataclass
class PreparedVolume:
    """A case after 3D preprocessing: the image on the training grid, labels on both grids."""

    name: str
    image: torch.Tensor  # (C, z, y, x) float32 in [0, 1] at the card's spacing
    grid_labels: torch.Tensor  # (z, y, x) uint8 on the same grid (nearest neighbour)
    label: np.ndarray  # (Z, Y, X) uint8 on the series' own grid
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]


def check_volume_kind(image: Volume) -> None:
    """A 3D encoder needs a volume: a single 2D picture (kind ``image``, e.g. a radiograph) is refused,
    as 3D pretraining dropped it (reason ``image``)."""
    if image.kind != "volume":
        raise VolumeError(f"{image.name}: a single 2D image (kind {image.kind}) cannot feed a 3D encoder")


def prepare_volume_case(
    image_ref: str,
    label_ref: str,
    pre: VolumePreprocessor,
    num_classes: int,
    modality: str | None,
    cache_dir: str | None,
) -> PreparedVolume:
    image = read_image(image_ref, modality=modality, cache_dir=cache_dir)
    check_volume_kind(image)
    label = read_label(label_ref, image, num_classes)
    try:
        grid = pre.forward(image.array, image.intensity, image.stats, image.spacing)
    except ValueError as e:
        raise VolumeError(f"{image_ref}: {e}") from None
    return PreparedVolume(
        name=image.name,
        image=grid,
        grid_labels=pre.labels(label, image.spacing).to(torch.uint8),
        label=label,
        shape=image.shape,
        spacing=image.spacing,
    )


def _pad_to(x: torch.Tensor, size: tuple[int, int, int]) -> torch.Tensor:
    """Pad the last three dims of ``x`` at their far end to at least ``size`` (with 0)."""
    extra = [max(0, s - n) for s, n in zip(size, x.shape[-3:], strict=True)]
    if not any(extra):
        return x
    return F.pad(x, (0, extra[2], 0, extra[1], 0, extra[0]), value=0)


class PatchDataset(EpochDataset):
    """``length`` random training patches per epoch over the prepared volumes (item ``i``: volume ``i % n``).

    ``epoch`` is set by the fine-tuning module at each epoch start (:class:`~medmae.finetune.samples.EpochHook`),
    so patches differ per epoch.
    """

    def __init__(
        self,
        cases: list[PreparedVolume],
        length: int,
        size: tuple[int, int, int],
        crop_scale: tuple[float, float],
        hflip_prob: float,
        foreground_prob: float,
        seed: int,
    ) -> None:
        super().__init__(seed)
        if not cases:
            raise VolumeError("no training volume")
        if not any(bool(c.grid_labels.any()) for c in cases):
            raise VolumeError("no training volume holds a labelled structure (all labels are background)")
        self.images = [_pad_to(c.image, size) for c in cases]
        self.labels = [_pad_to(c.grid_labels, size) for c in cases]
        self.foreground = []
        for lab in self.labels:
            points = torch.nonzero(lab).numpy()
            step = max(1, len(points) // MAX_FOREGROUND_POINTS)
            self.foreground.append(points[::step])
        self.length = int(length)
        self.size = size
        self.crop_scale = crop_scale
        self.hflip_prob = hflip_prob
        self.foreground_prob = foreground_prob

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        c = i % len(self.images)
        image, label, points = self.images[c], self.labels[c], self.foreground[c]
        rng = self.rng(i)
        f = float(rng.uniform(*self.crop_scale)) ** (1 / 3)
        extent = [max(1, min(n, int(round(s * f)))) for s, n in zip(self.size, label.shape, strict=True)]
        use_fg = rng.random() < self.foreground_prob and len(points) > 0
        centre = points[int(rng.integers(len(points)))] if use_fg else None
        start = []
        for axis in range(3):
            room = label.shape[axis] - extent[axis]
            if centre is None:
                start.append(int(rng.integers(room + 1)))
            else:  # the labelled voxel lands at a uniform place inside the patch
                start.append(int(np.clip(int(centre[axis]) - int(rng.integers(extent[axis])), 0, room)))
        box = tuple(slice(s, s + e) for s, e in zip(start, extent, strict=True))
        patch, patch_label = image[(slice(None), *box)], label[box].long()
        if tuple(extent) != self.size:
            patch = F.interpolate(patch[None], size=self.size, mode="trilinear", align_corners=False)[0]
            patch_label = F.interpolate(patch_label[None, None].float(), size=self.size, mode="nearest-exact")[0, 0]
            patch_label = patch_label.long()
        if rng.random() < self.hflip_prob:
            patch, patch_label = patch.flip(-1), patch_label.flip(-1)
        return {"image": patch.contiguous(), "label": patch_label[None].contiguous()}
