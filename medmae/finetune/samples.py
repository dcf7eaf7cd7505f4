"""Fine-tuning training samples as pure functions of (seed, epoch, index), for every task.

* :class:`EpochDataset`: the base of every fine-tuning training set (planes, series, 3D patches):
  its random state per item is ``(seed, epoch, index)``, so a sample does not depend on the worker
  that draws it nor on what was drawn before;
* :class:`EpochHook`: the one LightningModule hook that tells the datamodule's training set the epoch;
* :class:`PlaneDataset`: one plane per item, with its label plane (segmentation) or its series'
  target (classification), augmented by :func:`augment`;
* :func:`train_sampler`: ``samples_per_epoch`` draws per epoch, split across DDP ranks;
* :class:`TrainStream`: the datamodule side of exact resume. The training loader yields
  :func:`train_sampler`'s draws through :class:`TrainDraws`, which numbers them per epoch and keys
  each with ``(epoch, draw, item)`` (pretraining's :class:`~medmae.data.sampler.EpochStreamSampler`);
  every batch carries its ``epoch`` and draw ``index``, from which pretraining's
  :class:`~medmae.data.stream.TrainStreamPosition` records, checkpoints and restores the position of
  the last trained batch, so a resumed run continues the very stream of an uninterrupted one.
  On one process the draws stay torch ``RandomSampler``'s stream (its epoch ``e`` is the sampler's
  ``e + 1``-th pass, replayed from the seed on resume), so the samples are those of earlier releases.
  Each training step also seeds torch's global RNG from ``(seed, epoch, batch, rank)``
  (:func:`step_seed`), so what stochastic layers draw (drop path, dropout) is a function of the step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler, Sampler, default_collate

from medmae.data.augment import augment_planes
from medmae.data.options import AugmentOptions
from medmae.data.sampler import EpochStreamSampler, SampleKey
from medmae.data.stream import STEP_KEY, TrainStreamPosition
from medmae.data.transforms import random_resized_crop_box
from medmae.finetune.volumes import VolumeError

#: second entry of a training step's seed list (:func:`step_seed`); samples draw from ``[seed, epoch, item]``
STREAM_STEP = 1


class EpochDataset(Dataset):
    """A training set whose item ``i`` in epoch ``e`` draws from ``default_rng([seed, e, i])``."""

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)
        self.epoch = 0  # set by EpochHook at each epoch start

    def rng(self, i: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, i])


class EpochHook(pl.LightningModule):
    """Sets ``trainer.datamodule.train_set.epoch`` at each training epoch start (both fine-tuning modules).

    Training draws carry their epoch in their key (:class:`KeyedSamples` sets it per item); the hook
    keeps ``epoch`` right for any other use of the training set.
    """

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
    extra: AugmentOptions | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One random-resized crop (back to the encoder grid) and left-right flip of ``(..., C, H, W)`` planes
    and, when given, of their ``(H, W)`` label plane (nearest neighbour): the same box and flip for both;
    then ``extra`` (``data.augment``: rotation, zoom, bias field, gamma; :func:`augment_planes`), drawn
    after the crop and flip so that without it every sample is what it was before it existed."""
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
    if extra is not None and extra.active:
        images, label = augment_planes(images, extra, rng, label)
    return images.contiguous(), None if label is None else label.contiguous()


class PlaneDataset(EpochDataset):
    """Every plane of the prepared series is an item: ``image`` plus its ``label`` plane (segmentation,
    ``labels`` given) or its series' ``target`` (classification, ``targets`` given).

    Args:
        images: per series, its planes ``(N, C, H, W)`` on the encoder grid.
        labels: per series, its label planes ``(N, H, W)`` on the same grid (segmentation).
        targets: per series, its target vector (classification).
        only_labelled: keep only planes whose label plane holds a labelled structure (segmentation).
        extra: ``data.augment`` (rotation, zoom, bias field, gamma) after the crop and flip; None: none.
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
        extra: AugmentOptions | None = None,
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
        self.extra = extra

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        s, z = self.items[i]
        label = None if self.labels is None else self.labels[s][z]
        image, label = augment(self.images[s][z], self.rng(i), self.hflip_prob, self.crop_scale, label, self.extra)
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

    def epoch_draws(self, epoch: int) -> list[int]:
        """Every rank's ``total_size`` draws of ``epoch`` in draw order (rank ``r`` takes ``r, r + w, ...``)."""
        g = torch.Generator().manual_seed(int(np.random.SeedSequence([self.seed, epoch]).generate_state(1)[0]))
        if self.total == self.size:
            draws = torch.randperm(self.size, generator=g)
        else:
            draws = torch.randint(self.size, (self.total,), generator=g)
        return torch.cat([draws, draws[: self.total_size - self.total]]).tolist()  # equal counts per rank

    def __iter__(self) -> Iterator[int]:
        return iter(self.epoch_draws(self.epoch)[self.rank :: self.num_replicas])

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


class RandomSamplerPasses:
    """Epoch ``e`` of a torch ``RandomSampler`` with its own generator: its ``e + 1``-th pass, as one
    process trains it (every earlier epoch drawn in full) from the generator's state at construction
    (:func:`train_sampler` seeds it once). Any epoch is a pure function of that state and ``e``: an epoch
    before the last one computed is replayed from the start."""

    def __init__(self, sampler: RandomSampler) -> None:
        if sampler.generator is None:
            raise ValueError("RandomSamplerPasses needs a RandomSampler with its own generator")
        self.sampler, self.generator = sampler, sampler.generator
        self._start = self.generator.get_state()
        self._passes = 0  # passes the generator has made since _start
        self._last: tuple[int, list[int]] | None = None

    def __call__(self, epoch: int) -> list[int]:
        if self._last is not None and self._last[0] == epoch:
            return self._last[1]
        if epoch < self._passes:
            self.generator.set_state(self._start)
            self._passes = 0
        while self._passes <= epoch:
            draws = list(self.sampler)
            self._passes += 1
        self._last = (epoch, draws)
        return draws


class TrainDraws(EpochStreamSampler):
    """:func:`train_sampler`'s draws, numbered per epoch and resumable: pretraining's stream machinery.

    Yields :class:`~medmae.data.sampler.SampleKey` ``(epoch, draw, item)`` for this rank's draws
    ``rank, rank + w, ...``; with ``drop_last`` only the draws that fill whole batches on every rank
    (the rest would be dropped by the loader anyway), so the last trained batch of an epoch ends it.
    :meth:`follow` / :meth:`resume_at` continue an epoch after the draws already trained.
    """

    def __init__(
        self,
        data: Dataset,
        total: int,
        seed: int,
        trainer: pl.Trainer | None = None,
        batch_size: int = 1,
        drop_last: bool = False,
    ) -> None:
        sampler = train_sampler(data, total, seed, trainer)
        world = sampler.num_replicas if isinstance(sampler, ShardedDraws) else 1
        rank = sampler.rank if isinstance(sampler, ShardedDraws) else 0
        per_rank = math.ceil(int(total) / world)
        usable = per_rank // batch_size * batch_size if drop_last else per_rank
        super().__init__(data, usable, seed, world, rank)  # type: ignore[arg-type]
        self._draws: Callable[[int], Sequence[int]]
        if isinstance(sampler, ShardedDraws):
            self._draws = sampler.epoch_draws
        else:
            self._draws = RandomSamplerPasses(sampler)  # type: ignore[arg-type]

    def epoch_positions(self, epoch: int) -> Sequence[int]:
        return self._draws(epoch)


class KeyedSamples(Dataset):
    """The training set as its loader reads it: key ``(epoch, draw, item)`` -> ``(epoch, draw, sample)``,
    the sample being item ``item`` of ``data`` in that epoch (its random state ``(seed, epoch, item)``)."""

    def __init__(self, data: EpochDataset) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)  # type: ignore[arg-type]

    def __getitem__(self, key: SampleKey) -> tuple[int, int, Any]:
        epoch, draw, item = (int(k) for k in key)
        self.data.epoch = epoch
        return epoch, draw, self.data[item]


class KeyedCollate:
    """Collate the samples with ``collate`` (default: torch's) and add the batch's ``epoch`` and draw ``index``."""

    def __init__(self, collate: Callable[[list], dict[str, Any]] | None = None) -> None:
        self.collate = collate if collate is not None else default_collate

    def __call__(self, batch: list[tuple[int, int, Any]]) -> dict[str, Any]:
        out = self.collate([sample for _, _, sample in batch])
        out["epoch"] = torch.tensor([epoch for epoch, _, _ in batch])
        out["index"] = torch.tensor([draw for _, draw, _ in batch])
        return out


def step_seed(seed: int, epoch: int, batch: int, rank: int) -> int:
    """Seed of torch's global RNG for training step ``(epoch, batch)`` on ``rank``: what stochastic layers
    (drop path, dropout) draw in that step."""
    return int(np.random.SeedSequence([seed, STREAM_STEP, epoch, batch, rank]).generate_state(1, np.uint64)[0])


class TrainStream(TrainStreamPosition):
    """Fine-tuning datamodule mixin: a resumable training loader over an :class:`EpochDataset`.

    Pretraining's :class:`~medmae.data.stream.TrainStreamPosition` records the position of each trained
    batch, saves it in every checkpoint (``state_dict``) and restores it; :meth:`train_loader` makes
    the loader's :class:`TrainDraws` start every epoch right after that position. Right before each
    training step, torch's global RNG is seeded from ``(seed, epoch, batch, rank)`` (:func:`step_seed`),
    so the step's drop path / dropout is a function of the step too: no RNG state needs saving.
    """

    train_position: dict[str, int] | None = None
    _num_replicas: int = 1
    _stream_seed: int = 0
    _restored: bool = False

    def train_loader(
        self,
        data: EpochDataset,
        total: int,
        batch_size: int,
        num_workers: int,
        seed: int,
        collate_fn: Callable[[list], dict[str, Any]] | None = None,
    ) -> DataLoader:
        """``total`` draws per epoch (over all ranks) in batches; a last partial batch only when
        ``total < batch_size`` (then the one batch of the epoch)."""
        drop_last = total >= batch_size
        sampler = TrainDraws(data, total, seed, self.trainer, batch_size, drop_last)
        self._num_replicas = sampler.num_replicas
        self._stream_seed = int(seed)
        self._restored = getattr(self.trainer, "ckpt_path", None) is not None
        sampler.follow(self._trained_position)
        return DataLoader(
            KeyedSamples(data),
            batch_size=batch_size,
            sampler=sampler,
            num_workers=num_workers,
            drop_last=drop_last,
            collate_fn=KeyedCollate(collate_fn),
            persistent_workers=False,
        )

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        batch = super().on_before_batch_transfer(batch, dataloader_idx)
        if isinstance(batch, dict) and STEP_KEY in batch:
            epoch, number = batch[STEP_KEY]
            torch.manual_seed(step_seed(self._stream_seed, epoch, number, int(self.trainer.global_rank)))
            if self._restored:
                self._restored = False
                self._repair_restored_loop()
        return batch

    def _repair_restored_loop(self) -> None:
        """After a restore, count on from the uninterrupted run's logger step and epoch.

        Before every training batch of these modules (automatic optimization, one optimizer, no
        skipped step) Lightning's logger step (``_batches_that_stepped``) equals ``global_step`` and its
        processed-epoch count equals the completed one. A run restored from a checkpoint written at an
        epoch end gets both one too high (Lightning 2.x re-runs that epoch's end and counts it again):
        TensorBoard steps shift by one and ``max_epochs`` stops an epoch early. Set them back, once, at
        the first trained batch.
        """
        trainer = self.trainer
        fit_loop = getattr(trainer, "fit_loop", None)
        epoch_loop = getattr(fit_loop, "epoch_loop", None)
        if isinstance(getattr(epoch_loop, "_batches_that_stepped", None), int):
            epoch_loop._batches_that_stepped = int(trainer.global_step)  # type: ignore[union-attr]
        progress = getattr(fit_loop, "epoch_progress", None)
        for counts in (getattr(progress, "current", None), getattr(progress, "total", None)):
            if counts is not None and counts.processed > counts.completed:
                counts.processed = counts.completed
