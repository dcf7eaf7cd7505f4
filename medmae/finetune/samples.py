"""Fine-tuning training samples as pure functions of (seed, epoch, index), for every task.

* :class:`EpochDataset`: the base of every fine-tuning training set (planes, series, 3D patches):
  its random state per item is ``(seed, epoch, index)``, so a sample does not depend on the worker
  that draws it nor on what was drawn before;
* :class:`EpochHook`: the one LightningModule hook that tells the datamodule's training set the epoch;
* :class:`PlaneDataset`: one plane per item, with its label plane (segmentation) or its series'
  target (classification), augmented by :func:`augment`;
* :func:`train_sampler`: ``samples_per_epoch`` draws per epoch, split across DDP ranks.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, DistributedSampler, RandomSampler, Sampler

from medmae.data.transforms import random_resized_crop_box
from medmae.finetune.volumes import VolumeError


class EpochDataset(Dataset):
    """A training set whose item ``i`` in epoch ``e`` draws from ``default_rng([seed, e, i])``."""

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)
        self.epoch = 0  # set by EpochHook at each epoch start

    def rng(self, i: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, i])


class EpochHook(pl.LightningModule):
    """Sets ``trainer.datamodule.train_set.epoch`` at each training epoch start (both fine-tuning modules)."""

    def on_train_epoch_start(self) -> None:
        data = getattr(self.trainer.datamodule, "train_set", None)
        if isinstance(data, EpochDataset):
            data.epoch = int(self.current_epoch)


def augment(
    images: torch.Tensor,
    rng: np.random.Generator,
    hflip_prob: float,
    crop_scale: tuple[float, float],
    label: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One random-resized crop (back to the encoder grid) and left-right flip of ``(..., C, H, W)`` planes
    and, when given, of their ``(H, W)`` label plane (nearest neighbour): the same box and flip for both."""
    h, w = images.shape[-2:]
    if crop_scale[0] < 1.0:
        box = random_resized_crop_box(rng, (h, w), crop_scale)
        rows, cols = slice(box.top, box.top + box.height), slice(box.left, box.left + box.width)
        crop = images[..., rows, cols]
        flat = crop.reshape(-1, *crop.shape[-3:])
        images = F.interpolate(flat, size=(h, w), mode="bilinear", align_corners=False).reshape(images.shape)
        if label is not None:
            label = F.interpolate(label[None, None, rows, cols].float(), size=(h, w), mode="nearest-exact")[0, 0]
            label = label.long()
    if hflip_prob > 0 and rng.random() < hflip_prob:
        images = images.flip(-1)
        label = None if label is None else label.flip(-1)
    return images.contiguous(), None if label is None else label.contiguous()


class PlaneDataset(EpochDataset):
    """Every plane of the prepared series is an item: ``image`` plus its ``label`` plane (segmentation,
    ``labels`` given) or its series' ``target`` (classification, ``targets`` given).

    Args:
        images: per series, its planes ``(N, C, H, W)`` on the encoder grid.
        labels: per series, its label planes ``(N, H, W)`` on the same grid (segmentation).
        targets: per series, its target vector (classification).
        only_labelled: keep only planes whose label plane holds a labelled structure (segmentation).
    """

    def __init__(
        self,
        images: Sequence[torch.Tensor],
        crop_scale: tuple[float, float],
        hflip_prob: float,
        seed: int,
        *,
        labels: Sequence[torch.Tensor] | None = None,
        targets: Sequence[torch.Tensor] | None = None,
        only_labelled: bool = False,
    ) -> None:
        super().__init__(seed)
        if (labels is None) == (targets is None):
            raise ValueError("give exactly one of labels (segmentation) and targets (classification)")
        self.images, self.labels, self.targets = list(images), labels, targets
        self.items = [
            (s, z)
            for s, planes in enumerate(self.images)
            for z in range(planes.shape[0])
            if not only_labelled or labels is None or bool(labels[s][z].any())
        ]
        if not self.items:
            raise VolumeError(
                "no training plane holds a labelled structure (all labels are background)"
                if only_labelled
                else "no training plane"
            )
        self.crop_scale = crop_scale
        self.hflip_prob = hflip_prob

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        s, z = self.items[i]
        label = None if self.labels is None else self.labels[s][z]
        image, label = augment(self.images[s][z], self.rng(i), self.hflip_prob, self.crop_scale, label)
        if label is not None:
            return {"image": image, "label": label[None]}
        return {"image": image, "target": self.targets[s]}  # type: ignore[index]


class ShardedDraws(DistributedSampler):
    """``total`` draws per epoch over a dataset (with replacement unless ``total`` equals its length), rank
    ``r`` of ``w`` taking draws ``r, r + w, ...``: every rank the same count, together the epoch's draws.

    A ``DistributedSampler`` subclass, so Lightning keeps it (it would replace a plain sampler with a
    ``DistributedSampler`` over the dataset once, ignoring ``samples_per_epoch``); Lightning calls
    :meth:`set_epoch`, and the draws are a function of ``(seed, epoch)``.
    """

    def __init__(self, data: Dataset, total: int, seed: int, num_replicas: int, rank: int) -> None:
        super().__init__(data, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.size = len(data)  # type: ignore[arg-type]
        self.total = int(total)
        self.num_samples = math.ceil(self.total / num_replicas)
        self.total_size = self.num_samples * num_replicas

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(int(np.random.SeedSequence([self.seed, self.epoch]).generate_state(1)[0]))
        if self.total == self.size:
            draws = torch.randperm(self.size, generator=g)
        else:
            draws = torch.randint(self.size, (self.total,), generator=g)
        draws = torch.cat([draws, draws[: self.total_size - self.total]])  # equal counts per rank
        return iter(draws[self.rank :: self.num_replicas].tolist())

    def __len__(self) -> int:
        return self.num_samples


def train_sampler(data: Dataset, total: int, seed: int, trainer: pl.Trainer | None = None) -> Sampler[int]:
    """``total`` training draws per epoch: one process keeps torch's ``RandomSampler`` stream (seeded once),
    several DDP ranks share :class:`ShardedDraws` (each rank ``total / world_size`` of them)."""
    world = int(getattr(trainer, "world_size", 1) or 1) if trainer is not None else 1
    if world > 1:
        return ShardedDraws(data, total, seed, world, int(trainer.global_rank))  # type: ignore[union-attr]
    g = torch.Generator().manual_seed(seed)
    return RandomSampler(data, replacement=total != len(data), num_samples=total, generator=g)  # type: ignore[arg-type]
