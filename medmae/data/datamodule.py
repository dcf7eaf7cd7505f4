"""``CacheDataModule``: the cache -> batches part of the flow, as a LightningDataModule.

Train batches come from :class:`~medmae.data.sampler.EpochWeightedSampler` (weighted, epoch-keyed,
sharded by rank) over the ``train`` split; validation batches from the ``val`` split with centre
crops and fixed per-sample RNG, identical every epoch. Batches are dicts::

    {"image": float32 (B, C, H, W) in [0, 1], "index": int64 (B,), "series": int64 (B,),
     "slice": int64 (B,), "skipped": int64 (B,), "rejected": int64 (B,)}

Training batches also get ``"step_key": (epoch, batch number in the epoch)`` (host ints, from the
batch's own sampler keys) right before the training step; the MAE module seeds its masks from it.

``skipped``/``rejected`` count the replacements made for each sample (unreadable cache entry /
background crop); summing them in the training loop covers every worker. No path or PHI is in a
batch or in :meth:`CacheDataModule.preprocessing`.

Example YAML (LightningCLI; the option sections are ``medmae.data.options``, see docs/data.md)::

    data:
      cache_dir: /data/cache
      img_size: [224, 224]
      slices: 3
      batch_size: 64
      num_workers: 8
      intensity: {ct_windows: [[40, 400], [-600, 1500], [400, 1800]]}
      sampling: {samples_per_epoch: 64000}
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader

from medmae.data import splits
from medmae.data.augment import PlaneAugment
from medmae.data.cache import ManifestRow
from medmae.data.dataset import CacheSliceDataset
from medmae.data.device_path import collate_raw, finish_on_device
from medmae.data.index import AXES
from medmae.data.manifest_pin import CACHE_CHANGED_POLICIES, CacheChangedError, ManifestPin, read_manifest
from medmae.data.options import (
    DEFAULT_AUGMENT,
    DEFAULT_CROP,
    DEFAULT_FOREGROUND,
    DEFAULT_INTENSITY,
    DEFAULT_LOADER,
    DEFAULT_SAMPLING,
    DEFAULT_SELECTION,
    AugmentOptions,
    CropOptions,
    ForegroundOptions,
    IntensityOptions,
    LoaderOptions,
    SamplingOptions,
    SelectionOptions,
    int_at_least,
    sections,
)
from medmae.data.records import slice_record, volume_record
from medmae.data.sampler import STREAM_VAL_POSITIONS, EpochWeightedSampler, distributed_context
from medmae.data.splits import NoUsableDataError, verify_entries
from medmae.data.stream import STEP_KEY, TrainStreamPosition
from medmae.data.transforms import SliceTransform
from medmae.data.volume import VolumeOptions, VolumeTransform
from medmae.data.volume_dataset import CacheVolumeDataset

logger = logging.getLogger(__name__)

#: still importable from here (their home before issue 19)
__all__ = ["CACHE_CHANGED_POLICIES", "CacheChangedError", "CacheDataModule", "NoUsableDataError", "verify_entries"]


class CacheDataModule(ManifestPin, TrainStreamPosition, pl.LightningDataModule):
    """Batches of 2D / 2.5D crops (or 3D boxes) from a medmae cache (``medmae prep`` output) for MAE pretraining.

    The options that shape every sample are flat; the rest come in one section per concern
    (``medmae.data.options``: each validates itself and names its full key in a bad value's message).

    Args:
        cache_dir: the cache directory (holds ``manifest.json``).
        img_size: output size, an int (square) or ``(height, width)``.
        slices: planes per sample, stacked as channels in increasing array index along the
            axis (axial: inferior -> superior); clamped at the ends of a series (edge plane repeated).
            Single images (X-rays) repeat their one plane. 1 = plain 2D.
        axis: ``"axial"``, ``"coronal"`` or ``"sagittal"``; only volumes whose planes along it have
            pixels at most ``selection.max_anisotropy`` times taller than wide (or vice versa) are used.
        batch_size: per-device batch size.
        num_workers: DataLoader worker processes (0 = load in the main process).
        seed: base seed (>= 0) of all sampling and augmentation randomness.
        slice_spacing_mm: ``None`` (default): the planes are adjacent by array index. A number: channel
            ``j`` sits ``offset_j * slice_spacing_mm`` from the centre plane in every series; coarser
            series and single images are then not used (reason ``slice_spacing``). Ignored when ``slices == 1``.
        slice_interpolation: with ``slice_spacing_mm``: ``"nearest"`` plane or ``"linear"`` blend
            of the two bracketing planes.
        selection: which series are used (:class:`~medmae.data.options.SelectionOptions`).
        sampling: how positions are drawn (:class:`~medmae.data.options.SamplingOptions`).
        crop: 2D crop, flip and resize (:class:`~medmae.data.options.CropOptions`).
        intensity: CT windows and percentiles (:class:`~medmae.data.options.IntensityOptions`).
        foreground: the background-crop filter (:class:`~medmae.data.options.ForegroundOptions`).
        loader: workers, pinning, the GPU data path (:class:`~medmae.data.options.LoaderOptions`).
        augment: random rotation, zoom, bias field and gamma of 2D training batches, after intensity
            (:class:`~medmae.data.options.AugmentOptions`; off by default; 2D / 2.5D only).
        volume: ``None`` (default): 2D / 2.5D slice samples. A :class:`~medmae.data.volume.VolumeOptions`
            (YAML: ``volume: {size: [96, 96, 96], spacing_mm: 1.5, ...}``): 3D samples for the 3D MAE,
            ``(C, Z, Y, X)`` crops resampled to ``spacing_mm`` (``medmae.data.volume``). ``intensity``,
            ``foreground``, ``sampling``, ``loader`` and ``selection.modalities`` apply as in 2D;
            ``img_size``, ``slices``, ``axis``, ``crop`` and the other ``selection`` options do not
            (``volume`` has its own).
        cache_changed: a resumed run on a cache whose manifest is not the version its checkpoint was
            trained on (``medmae.data.manifest_pin``): ``"error"`` (default) refuses in one line, since
            it would not continue the same data stream; ``"warn"`` logs and trains on the new cache.
        **legacy: the flat options from before issue 19 (``crop_scale=...``, ``min_size=...``): each is
            moved into its section (:data:`~medmae.data.options.LEGACY_KEYS`) with a
            ``DeprecationWarning``, so older scripts keep working.

    Sections are dataclasses; from Python a mapping of a section's fields works too.

    Examples::

        dm = CacheDataModule("cache/", img_size=224, slices=3, batch_size=32, num_workers=4,
                             crop=CropOptions(crop_scale=(0.4, 1.0)), sampling={"samples_per_epoch": 3200})
        dm.setup("fit")
        batch = next(iter(dm.train_dataloader()))   # batch["image"]: (32, 3, 224, 224)
    """

    def __init__(
        self,
        cache_dir: str,
        img_size: int | tuple[int, int] = 224,
        slices: int = 1,
        axis: str = "axial",
        batch_size: int = 64,
        num_workers: int = 8,
        seed: int = 0,
        *,
        slice_spacing_mm: float | None = None,
        slice_interpolation: str = "nearest",
        selection: SelectionOptions = DEFAULT_SELECTION,
        sampling: SamplingOptions = DEFAULT_SAMPLING,
        crop: CropOptions = DEFAULT_CROP,
        intensity: IntensityOptions = DEFAULT_INTENSITY,
        foreground: ForegroundOptions = DEFAULT_FOREGROUND,
        loader: LoaderOptions = DEFAULT_LOADER,
        augment: AugmentOptions = DEFAULT_AUGMENT,
        volume: VolumeOptions | None = None,
        cache_changed: str = "error",
        **legacy: Any,
    ) -> None:
        super().__init__()
        given = {"selection": selection, "sampling": sampling, "crop": crop, "intensity": intensity,
                 "foreground": foreground, "loader": loader, "augment": augment}  # fmt: skip
        chosen = sections(given, legacy)
        #: the option sections (frozen dataclasses, checked)
        self.selection: SelectionOptions = chosen["selection"]
        self.sampling: SamplingOptions = chosen["sampling"]
        self.crop: CropOptions = chosen["crop"]
        self.intensity: IntensityOptions = chosen["intensity"]
        self.foreground: ForegroundOptions = chosen["foreground"]
        self.loader: LoaderOptions = chosen["loader"]
        self.augment: AugmentOptions = chosen["augment"]
        #: random rotation / zoom / shading of training batches, after intensity (off by default)
        self.augmenter = PlaneAugment(self.augment)
        if cache_changed not in CACHE_CHANGED_POLICIES:
            raise ValueError(f"data.cache_changed must be one of {CACHE_CHANGED_POLICIES}, got {cache_changed!r}")
        self.cache_changed = cache_changed
        #: content hash of the manifest this run's indices were built from (``setup``); in checkpoints
        self.manifest_version: str | None = None
        self._pinned_manifest: str | None = None  # the version a resumed checkpoint was trained on
        if not isinstance(cache_dir, str | Path) or not str(cache_dir):
            raise ValueError(f"data.cache_dir must be a non-empty path, got {cache_dir!r}")
        if isinstance(img_size, int) and not isinstance(img_size, bool):
            size: Any = (img_size, img_size)
        elif isinstance(img_size, Sequence) and not isinstance(img_size, str):
            size = tuple(img_size)
        else:
            raise ValueError(f"data.img_size must be a positive int or a pair of positive ints, got {img_size!r}")
        if axis not in AXES:
            raise ValueError(f"data.axis must be one of {tuple(AXES)}, got {axis!r}")
        self.batch_size = int_at_least(batch_size, "data.batch_size", 1)
        self.num_workers = int_at_least(num_workers, "data.num_workers", 0)
        self.seed = int_at_least(seed, "data.seed", 0)
        samples = self.sampling.samples_per_epoch
        if samples is not None and samples < self.batch_size:
            raise ValueError(
                f"data.sampling.samples_per_epoch={samples} is smaller than data.batch_size={self.batch_size}: "
                "no full batch per epoch (raise samples_per_epoch or lower batch_size)"
            )
        self.axis = axis
        self.cache_dir = Path(cache_dir)
        self.transform = SliceTransform(  # the crop section's fields are SliceTransform's own arguments
            size,
            slices=slices,
            slice_spacing_mm=slice_spacing_mm,
            slice_interpolation=slice_interpolation,
            **dataclasses.asdict(self.crop),
            intensity=self.intensity.rule(self.foreground),
        )
        if volume is not None and not isinstance(volume, VolumeOptions):
            raise ValueError(f"data.volume must be a VolumeOptions section or null, got {volume!r}")
        if volume is not None and slices != 1:
            raise ValueError(f"data.slices={slices} with data.volume: 3D samples have no slice channels; set slices: 1")
        if volume is not None and self.augment.active:
            raise ValueError("data.augment is 2D only (rotation, zoom, shading of planes): leave it off for 3D")
        if volume is not None and self.loader.device_transforms:
            raise ValueError("data.loader.device_transforms: true is 2D only; 3D samples are finished in the workers")
        #: the 3D sample rule (``None``: 2D / 2.5D slices)
        self.volume_transform = None if volume is None else VolumeTransform(volume, self.transform.intensity)
        self.train_dataset: CacheSliceDataset | CacheVolumeDataset | None = None
        self.val_dataset: CacheSliceDataset | CacheVolumeDataset | None = None
        #: per split: series kept, slices, and drop counts by reason (filled by ``setup``)
        self.setup_report: dict[str, dict[str, Any]] = {}
        #: counts (never ids) of the training series actually used, after every filter (``setup``)
        self.training_data: dict[str, Any] | None = None
        #: where training stands in the sampler's stream: the epoch and the draws (over all ranks) of
        #: the last batch handed to a training step; saved in checkpoints (``state_dict``)
        self.train_position: dict[str, int] | None = None
        self._num_replicas = 1

    # ------------------------------------------------------------------ what the model needs to know

    @property
    def channels(self) -> int:
        """Channels of every sample: ``slices`` x (number of CT windows in ``"channels"`` mode, else 1)."""
        if self.volume_transform is not None:
            return self.volume_transform.channels
        return self.transform.channels

    @property
    def image_size(self) -> tuple[int, ...]:
        """``(height, width)`` of every slice sample; ``(Z, Y, X)`` of every 3D sample."""
        if self.volume_transform is not None:
            return self.volume_transform.out_shape
        return self.transform.out_size

    @property
    def spatial_dims(self) -> int:
        """2 for slice samples (2D / 2.5D), 3 for volumes."""
        return 2 if self.volume_transform is None else 3

    def preprocessing(self) -> dict[str, Any]:
        """JSON-able record of every data choice, for the checkpoint/export card (no paths, no PHI)."""
        if self.volume_transform is not None:
            return volume_record(self)
        return slice_record(self)

    # ------------------------------------------------------------------ setup

    def _spacing_filter(self) -> float | None:
        """``slice_spacing_mm`` when it places channels (k > 1), the value selection filters with."""
        rule = self.transform.neighbours
        return float(rule.spacing_mm) if rule.by_distance else None  # type: ignore[arg-type]

    def _build_split(self, split: str, rows: Sequence[ManifestRow]) -> CacheSliceDataset | CacheVolumeDataset | None:
        volume = self.volume_transform
        options = None if volume is None else volume.options
        index, dropped, total = splits.index_split(
            self.cache_dir, rows, split, axis=self.axis, selection=self.selection, sampling=self.sampling,
            spacing_mm=self._spacing_filter(), volume=options, verify=self.loader.verify_on_setup,
        )  # fmt: skip
        self.setup_report[split] = splits.split_report(index, dropped)
        if split == "train":
            self.training_data = splits.training_data(index, dropped)
        logger.info("%s split: %s", split, self.setup_report[split])
        if len(index) == 0:
            if split == "train":
                what, hints = "slice" if volume is None else "volume", self._drop_hints()
                raise splits.no_usable_data(self.cache_dir, what, total, dropped, hints)
            return None
        positions = None
        val_samples = self.sampling.val_samples
        if split == "val" and val_samples is not None:
            positions = index.draw(np.random.default_rng([self.seed, STREAM_VAL_POSITIONS]), val_samples)
        dataset, transform = (CacheSliceDataset, self.transform) if volume is None else (CacheVolumeDataset, volume)
        return dataset(  # type: ignore[operator]
            self.cache_dir,
            index,
            transform,
            seed=self.seed,
            random_crop=split == "train",
            positions=positions,
            foreground_tries=self.foreground.foreground_tries,
            max_open_files=self.loader.max_open_files,
        )

    def _drop_hints(self) -> dict[str, str]:
        return splits.drop_options(self.selection, self._spacing_filter(), self.volume_transform is not None)

    def setup(self, stage: str | None = None) -> None:
        """Read the manifest and build the indices the stage needs (``fit``: train + val)."""
        need_train = stage in (None, "fit") and self.train_dataset is None
        need_val = stage in (None, "fit", "validate") and self.val_dataset is None and "val" not in self.setup_report
        if not (need_train or need_val):
            return
        manifest = read_manifest(self.cache_dir)
        self._pin_manifest(manifest.version)
        if need_train:
            self.train_dataset = self._build_split("train", manifest.rows)
        if need_val:
            self.val_dataset = self._build_split("val", manifest.rows)

    # ------------------------------------------------------------------ loaders

    def _replicas(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is not None:
            return int(trainer.world_size), int(trainer.global_rank)
        return distributed_context()

    def _loader_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "batch_size": self.batch_size,
            "num_workers": self.num_workers,
            "pin_memory": self.loader.pin_memory and torch.cuda.is_available(),
        }
        if self.num_workers > 0:
            kwargs["persistent_workers"] = self.loader.persistent_workers
            kwargs["prefetch_factor"] = self.loader.prefetch_factor
        return kwargs

    def train_sampler(self) -> EpochWeightedSampler:
        """A new sampler over the training index for this process's rank."""
        if self.train_dataset is None:
            self.setup("fit")
        assert self.train_dataset is not None
        replicas, rank = self._replicas()
        sampler = EpochWeightedSampler(
            self.train_dataset.index,
            self._epoch_samples(replicas),
            seed=self.seed,
            num_replicas=replicas,
            rank=rank,
            batch_size=self.batch_size,  # the loader drops partial batches: an epoch is whole batches
        )
        if len(sampler) < self.batch_size:
            raise ValueError(
                f"data.sampling.samples_per_epoch gives {len(sampler)} samples per device, fewer than data.batch_size "
                f"{self.batch_size}: no full batch per epoch (raise samples_per_epoch or lower batch_size)"
            )
        return sampler

    def _epoch_samples(self, replicas: int) -> int:
        """Draws per epoch: ``samples_per_epoch``, by default one per indexed slice but never less than one
        full batch per device (draws are with replacement, so a tiny cache still trains)."""
        if self.train_dataset is None:
            self.setup("fit")
        assert self.train_dataset is not None
        return self.sampling.samples_per_epoch or max(len(self.train_dataset.index), self.batch_size * replicas)

    def check_batches_per_epoch(self, world_size: int) -> None:
        """Raise ``ValueError`` when an epoch would not give every one of ``world_size`` devices a full batch."""
        samples = self._epoch_samples(world_size)
        if samples // world_size < self.batch_size:
            raise ValueError(
                f"data.sampling.samples_per_epoch={samples} gives {samples // world_size} samples per device on "
                f"{world_size} device(s), fewer than data.batch_size={self.batch_size}: no full batch per epoch"
            )

    def pixels_on_device(self) -> bool:
        """Whether batches are finished on the device (``loader.device_transforms``; null: when training on CUDA)."""
        if self.volume_transform is not None:
            return False
        if self.loader.device_transforms is not None:
            return self.loader.device_transforms
        trainer = self.trainer
        return trainer is not None and trainer.strategy.root_device.type == "cuda"

    def _loader(self, dataset: CacheSliceDataset | CacheVolumeDataset, **kwargs: Any) -> DataLoader:
        deferred = self.pixels_on_device()
        dataset.defer_pixels = deferred  # before the workers start: they get a copy
        collate = {"collate_fn": collate_raw} if deferred else {}
        return DataLoader(dataset, **kwargs, **collate, **self._loader_kwargs())

    def train_dataloader(self) -> DataLoader:
        sampler = self.train_sampler()
        self._num_replicas = sampler.num_replicas
        sampler.follow(self._trained_position)
        assert self.train_dataset is not None
        return self._loader(self.train_dataset, sampler=sampler, drop_last=True)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """GPU data path: flip, resize and scale the batch's stored-value crops on the device; then
        ``data.augment`` on training batches (those stamped with their stream position)."""
        batch = finish_on_device(batch, self.transform)
        if self.augmenter.active and isinstance(batch, dict) and STEP_KEY in batch:
            epoch, number = batch[STEP_KEY]
            rank = self.trainer.global_rank if self.trainer is not None else 0
            batch["image"] = self.augmenter(batch["image"], self.augmenter.generator(self.seed, rank, epoch, number))
        return batch

    def val_dataloader(self) -> DataLoader | list:
        if self.val_dataset is None and "val" not in self.setup_report:
            self.setup("validate")
        if self.val_dataset is None:
            warnings.warn("the cache has no usable validation series: validation is skipped", stacklevel=2)
            return []
        return self._loader(self.val_dataset, shuffle=False, drop_last=False)
