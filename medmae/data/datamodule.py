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

Example YAML (LightningCLI)::

    data:
      class_path: medmae.data.CacheDataModule
      init_args:
        cache_dir: /data/cache
        img_size: [224, 224]
        slices: 3
        batch_size: 64
        num_workers: 8
        ct_windows: [[40, 400], [-600, 1500], [400, 1800]]
"""

from __future__ import annotations

import logging
import math
import warnings
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader

from medmae.data.cache import CacheEntryError, ManifestRow, check_series_array, load_manifest
from medmae.data.dataset import CacheSliceDataset
from medmae.data.device_path import collate_raw, finish_on_device
from medmae.data.index import AXES, SliceIndex, select_series
from medmae.data.intensity import IntensityRule
from medmae.data.records import slice_record, volume_record
from medmae.data.sampler import STREAM_VAL_POSITIONS, EpochWeightedSampler, distributed_context
from medmae.data.stream import TrainStreamPosition
from medmae.data.transforms import DEFAULT_CT_WINDOWS, SliceTransform
from medmae.data.volume import VolumeIndex, VolumeOptions, VolumeTransform, select_volumes
from medmae.data.volume_dataset import CacheVolumeDataset

logger = logging.getLogger(__name__)


class NoUsableDataError(RuntimeError):
    """After filtering and dropping unreadable entries, a split the run needs has no slices left."""


class CacheChangedError(RuntimeError):
    """The cache's manifest is not the version the run (or the checkpoint it resumes) started on."""


#: ``cache_changed`` values: refuse, or warn and go on with the new manifest.
CACHE_CHANGED_POLICIES = ("error", "warn")


def _check_int(value: Any, field: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{field} must be an int >= {minimum}, got {value!r}")
    return value


def _check_number(value: Any, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{field} must be a finite number, got {value!r}")
    return float(value)


def _check_optional_int(value: Any, field: str, minimum: int) -> int | None:
    return None if value is None else _check_int(value, field, minimum)


def verify_entries(cache_dir: Path, rows: Sequence[ManifestRow]) -> tuple[tuple[ManifestRow, ...], Counter[str]]:
    """Keep the rows whose array opens and matches its record (header read only); count the others."""
    ok: list[ManifestRow] = []
    dropped: Counter[str] = Counter()
    for row in rows:
        try:
            check_series_array(cache_dir, row)
        except CacheEntryError as e:
            dropped[e.reason] += 1
            logger.debug("dropping cache entry %s at setup: %s", row.series_id, e.reason)
        else:
            ok.append(row)
    return tuple(ok), dropped


class CacheDataModule(TrainStreamPosition, pl.LightningDataModule):
    """Batches of 2D / 2.5D crops from a medmae cache (``medmae prep`` output) for MAE pretraining.

    Args:
        cache_dir: the cache directory (holds ``manifest.json``).
        img_size: output size, an int (square) or ``(height, width)``.
        slices: planes per sample, stacked as channels in increasing array index along the
            axis (axial: inferior -> superior); clamped at the ends of a series (edge plane repeated).
            Single images (X-rays) repeat their one plane. 1 = plain 2D.
        slice_spacing_mm: ``None`` (default): the planes are adjacent by array index, so a 0.625 mm
            and a 5 mm series give channels 0.625 mm and 5 mm apart. A number: channel ``j`` sits
            ``offset_j * slice_spacing_mm`` from the centre plane along the axis, in every series;
            series coarser than that along the axis, and single images, are then not used (reason
            ``slice_spacing``). Ignored when ``slices == 1``.
        slice_interpolation: with ``slice_spacing_mm``: ``"nearest"`` plane or ``"linear"`` blend
            of the two bracketing planes.
        axis: ``"axial"``, ``"coronal"`` or ``"sagittal"``; only volumes whose planes along it have
            pixels at most ``max_anisotropy`` times taller than wide (or vice versa) are used.
        batch_size: per-device batch size.
        num_workers: DataLoader worker processes (0 = load in the main process).
        seed: base seed (>= 0) of all sampling and augmentation randomness.
        modalities: modality codes to use (e.g. ``["CT", "MR"]``), or ``None`` for all.
        min_size: smallest plane height/width in pixels; smaller series are dropped.
        min_slices: smallest number of planes of a volume along ``axis``; images are exempt.
        include_images: use single 2D images (kind ``image``: CR/DX/MG...).
        max_anisotropy: largest plane pixel-spacing ratio of a volume along ``axis``.
        sampling_alpha: series weight ``n_slices ** alpha``, slices equal within a series
            (0 = every series equal, 1 = every slice equal).
        samples_per_epoch: training samples per epoch over all devices; default: the number of
            indexed training slices, at least one full batch per device.
        val_samples: validation samples: ``None`` = every indexed validation slice once, in order;
            an int = that many positions drawn once by the sampling policy (fixed seed).
        crop_scale: random-resized-crop area fraction range (MAE: 0.2-1.0).
        crop_ratio: random-resized-crop aspect range, relative to the output aspect (MAE: 3/4-4/3).
        hflip_prob: probability of a left-right flip of a training crop (0 disables).
        interpolation: resize interpolation, ``"bilinear"`` (default) or ``"bicubic"`` (as MAE's
            torchvision pipeline; ~0.25 ms more per sample at 224²).
        antialias: antialias when downscaling.
        ct_windows: CT windows as ``[level, width]`` in HU (default soft tissue, lung, bone).
        ct_window_mode: ``"random"`` (one window per sample; one listed window = fixed window) or
            ``"channels"`` (all windows as channels; non-CT series repeat their image per window).
        ct_inference_window: index into ``ct_windows`` of the fixed window fine-tuning and inference
            use in ``"random"`` mode (written to the card; pretraining still draws at random).
        percentiles: stored percentiles mapped to 0 and 1 for non-HU series (MR, X-ray, ...).
        foreground_fraction: minimum fraction of foreground pixels in a crop's centre slice; crops
            below it are replaced (up to ``foreground_tries`` times). 0 disables the filter.
        foreground_hu: CT foreground threshold in HU.
        foreground_level: non-CT foreground threshold as a fraction of the percentile range.
        foreground_tries: most background crops replaced per sample.
        pin_memory: pin batches in page-locked memory (only when CUDA is available); Lightning then
            copies them to the device without blocking.
        device_transforms: the GPU data path (``medmae.data.device_path``): workers only read crops,
            the device flips, resizes and scales them per batch. ``null`` (default): on when training
            on CUDA, off on CPU. Same values either way.
        persistent_workers: keep workers alive between epochs (only when ``num_workers > 0``).
        prefetch_factor: batches prefetched per worker (only when ``num_workers > 0``).
        max_open_files: memory-mapped series kept open per worker.
        verify_on_setup: open every selected array's header at setup and drop unreadable entries.
        volume: ``None`` (default): 2D / 2.5D slice samples. A :class:`~medmae.data.volume.VolumeOptions`
            (YAML: ``volume: {size: [96, 96, 96], spacing_mm: 1.5, ...}``): 3D samples for the 3D MAE,
            ``(C, Z, Y, X)`` crops resampled to ``spacing_mm`` (``medmae.data.volume``). The
            intensity, foreground, modality, sampling and loader options above apply as in 2D;
            ``img_size``, ``slices``, ``axis``, the 2D crop/flip/resize options, ``min_size``,
            ``min_slices``, ``include_images`` and ``max_anisotropy`` do not (``volume`` has its own).
        cache_changed: what a run resumed from a checkpoint does when the cache's manifest is not
            the version the checkpoint was trained on (a ``medmae prep`` rerun added, updated or
            removed series since): ``"error"`` (default) refuses with a one-line message, since the
            resumed run would not continue the same data stream; ``"warn"`` logs a warning and
            trains on the new cache. The version is read once at setup and saved in checkpoints.

    Examples::

        dm = CacheDataModule("cache/", img_size=224, slices=3, batch_size=32, num_workers=4)
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
        modalities: list[str] | None = None,
        min_size: int = 32,
        min_slices: int = 1,
        include_images: bool = True,
        max_anisotropy: float = 1.5,
        sampling_alpha: float = 0.5,
        samples_per_epoch: int | None = None,
        val_samples: int | None = None,
        crop_scale: tuple[float, float] = (0.2, 1.0),
        crop_ratio: tuple[float, float] = (3 / 4, 4 / 3),
        hflip_prob: float = 0.5,
        interpolation: str = "bilinear",
        antialias: bool = True,
        ct_windows: Sequence[tuple[float, float]] = DEFAULT_CT_WINDOWS,
        ct_window_mode: str = "random",
        ct_inference_window: int = 0,
        percentiles: tuple[float, float] = (0.5, 99.5),
        foreground_fraction: float = 0.0,
        foreground_hu: float = -500.0,
        foreground_level: float = 0.1,
        foreground_tries: int = 10,
        pin_memory: bool = True,
        device_transforms: bool | None = None,
        persistent_workers: bool = True,
        prefetch_factor: int = 2,
        max_open_files: int = 64,
        verify_on_setup: bool = True,
        volume: VolumeOptions | None = None,
        cache_changed: str = "error",
    ) -> None:
        super().__init__()
        if cache_changed not in CACHE_CHANGED_POLICIES:
            raise ValueError(f"cache_changed must be one of {CACHE_CHANGED_POLICIES}, got {cache_changed!r}")
        self.cache_changed = cache_changed
        #: content hash of the manifest this run's indices were built from (``setup``); in checkpoints
        self.manifest_version: str | None = None
        self._pinned_manifest: str | None = None  # the version a resumed checkpoint was trained on
        if not isinstance(cache_dir, str | Path) or not str(cache_dir):
            raise ValueError(f"cache_dir must be a non-empty path, got {cache_dir!r}")
        if isinstance(img_size, int) and not isinstance(img_size, bool):
            size: Any = (img_size, img_size)
        elif isinstance(img_size, Sequence) and not isinstance(img_size, str):
            size = tuple(img_size)
        else:
            raise ValueError(f"img_size must be a positive int or a pair of positive ints, got {img_size!r}")
        if axis not in AXES:
            raise ValueError(f"axis must be one of {tuple(AXES)}, got {axis!r}")
        self.batch_size = _check_int(batch_size, "batch_size", 1)
        self.num_workers = _check_int(num_workers, "num_workers", 0)
        self.seed = _check_int(seed, "seed", 0)
        if modalities is not None and (
            isinstance(modalities, str) or not all(isinstance(m, str) and m for m in modalities) or not modalities
        ):
            raise ValueError(f"modalities must be a non-empty list of modality codes or None, got {modalities!r}")
        self.modalities = None if modalities is None else sorted({m.upper() for m in modalities})
        self.min_size = _check_int(min_size, "min_size", 1)
        self.min_slices = _check_int(min_slices, "min_slices", 1)
        self.include_images = bool(include_images)
        if not _check_number(max_anisotropy, "max_anisotropy") >= 1.0:
            raise ValueError(f"max_anisotropy must be >= 1, got {max_anisotropy!r}")
        self.max_anisotropy = float(max_anisotropy)
        if not 0.0 <= _check_number(sampling_alpha, "sampling_alpha") <= 1.0:
            raise ValueError(f"sampling_alpha must be in [0, 1], got {sampling_alpha!r}")
        self.sampling_alpha = float(sampling_alpha)
        self.samples_per_epoch = _check_optional_int(samples_per_epoch, "samples_per_epoch", 1)
        if self.samples_per_epoch is not None and self.samples_per_epoch < self.batch_size:
            raise ValueError(
                f"samples_per_epoch={self.samples_per_epoch} is smaller than batch_size={self.batch_size}: "
                "no full batch per epoch (raise samples_per_epoch or lower batch_size)"
            )
        self.val_samples = _check_optional_int(val_samples, "val_samples", 1)
        self.foreground_tries = _check_int(foreground_tries, "foreground_tries", 0)
        self.pin_memory = bool(pin_memory)
        if device_transforms is not None and not isinstance(device_transforms, bool):
            raise ValueError(f"device_transforms must be true, false or null (auto), got {device_transforms!r}")
        self.device_transforms = device_transforms
        self.persistent_workers = bool(persistent_workers)
        self.prefetch_factor = _check_int(prefetch_factor, "prefetch_factor", 1)
        self.max_open_files = _check_int(max_open_files, "max_open_files", 1)
        self.verify_on_setup = bool(verify_on_setup)
        self.axis = axis
        self.cache_dir = Path(cache_dir)
        self.transform = SliceTransform(
            size,
            slices=slices,
            slice_spacing_mm=slice_spacing_mm,
            slice_interpolation=slice_interpolation,
            crop_scale=crop_scale,
            crop_ratio=crop_ratio,
            hflip_prob=hflip_prob,
            interpolation=interpolation,
            antialias=antialias,
            intensity=IntensityRule.checked(
                ct_windows,
                ct_window_mode,
                ct_inference_window,
                percentiles,
                foreground_fraction,
                foreground_hu,
                foreground_level,
            ),
        )
        if volume is not None and not isinstance(volume, VolumeOptions):
            raise ValueError(f"data.volume must be a VolumeOptions section or null, got {volume!r}")
        if volume is not None and slices != 1:
            raise ValueError(f"data.slices={slices} with data.volume: 3D samples have no slice channels; set slices: 1")
        if volume is not None and device_transforms:
            raise ValueError("data.device_transforms: true is 2D only; 3D samples are finished in the workers")
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

    def _select(self, split: str, rows: Sequence[ManifestRow]) -> Any:
        if self.volume_transform is not None:
            return select_volumes(rows, split=split, options=self.volume_transform.options, modalities=self.modalities)
        return select_series(
            rows,
            split=split,
            axis=self.axis,
            modalities=self.modalities,
            min_size=self.min_size,
            min_slices=self.min_slices,
            include_images=self.include_images,
            max_anisotropy=self.max_anisotropy,
            slice_spacing_mm=self._spacing_filter(),
        )

    def _build_split(self, split: str, rows: Sequence[ManifestRow]) -> CacheSliceDataset | CacheVolumeDataset | None:
        selection = self._select(split, rows)
        if selection.dropped.get("slice_spacing"):
            logger.info(
                "%s split: %d series coarser than data.slice_spacing_mm=%g along the %s axis (or single images) "
                "are not used",
                split,
                selection.dropped["slice_spacing"],
                self._spacing_filter(),
                self.axis,
            )
        kept, dropped = selection.rows, Counter(selection.dropped)
        total = len(selection.rows) + sum(selection.dropped.values())
        if self.verify_on_setup:
            kept, unreadable = verify_entries(self.cache_dir, kept)
            if unreadable:
                logger.warning(
                    "%s split: dropped %d unreadable cache entries at setup (%s)",
                    split,
                    sum(unreadable.values()),
                    ", ".join(f"{k}: {v}" for k, v in sorted(unreadable.items())),
                )
            dropped.update(unreadable)
        index: SliceIndex | VolumeIndex
        if self.volume_transform is not None:
            index = VolumeIndex(kept, self.volume_transform.options, self.sampling_alpha)
        else:
            index = SliceIndex(kept, self.axis, self.sampling_alpha)
        self.setup_report[split] = {**index.describe(), "dropped": dict(sorted(dropped.items()))}
        if split == "train":
            self.training_data = {
                "split": "train",
                "after": "every selection filter and the setup check of unreadable entries",
                **index.composition(),
                "dropped": dict(sorted(dropped.items())),
            }
        logger.info("%s split: %s", split, self.setup_report[split])
        if len(index) == 0:
            if split == "train":
                fields = {
                    "modality": f"data.modalities={self.modalities}",
                    "image": f"data.include_images={self.include_images}",
                    "min_size": f"data.min_size={self.min_size}",
                    "min_slices": f"data.min_slices={self.min_slices}",
                    "anisotropy": f"data.max_anisotropy={self.max_anisotropy}",
                    "slice_spacing": f"data.slice_spacing_mm={self._spacing_filter()}",
                    "volume_anisotropy": "data.volume.max_anisotropy",
                    "volume_coverage": "data.volume.min_coverage (and size x spacing_mm)",
                }
                if self.volume_transform is not None:
                    fields["image"] = "3D samples (data.volume) use volumes only"
                named = [fields[r] for r in sorted(dropped) if r in fields]
                hint = f"dropped by {', '.join(named)}" if named else "check the cache's reject report (medmae prep)"
                what = "volume" if self.volume_transform is not None else "slice"
                raise NoUsableDataError(
                    f"data.cache_dir {self.cache_dir}: no usable training {what} ({total} train series, dropped "
                    f"{dict(sorted(dropped.items())) or 'none'}); {hint}"
                )
            return None
        positions = None
        random_crop = split == "train"
        if split == "val" and self.val_samples is not None:
            positions = index.draw(np.random.default_rng([self.seed, STREAM_VAL_POSITIONS]), self.val_samples)
        if isinstance(index, VolumeIndex):
            assert self.volume_transform is not None
            return CacheVolumeDataset(
                self.cache_dir,
                index,
                self.volume_transform,
                seed=self.seed,
                random_crop=random_crop,
                positions=positions,
                foreground_tries=self.foreground_tries,
                max_open_files=self.max_open_files,
            )
        return CacheSliceDataset(
            self.cache_dir,
            index,
            self.transform,
            seed=self.seed,
            random_crop=random_crop,
            positions=positions,
            foreground_tries=self.foreground_tries,
            max_open_files=self.max_open_files,
        )

    def setup(self, stage: str | None = None) -> None:
        """Read the manifest and build the indices the stage needs (``fit``: train + val)."""
        need_train = stage in (None, "fit") and self.train_dataset is None
        need_val = stage in (None, "fit", "validate") and self.val_dataset is None and "val" not in self.setup_report
        if not (need_train or need_val):
            return
        if not self.cache_dir.exists():
            raise FileNotFoundError(f"data.cache_dir {self.cache_dir} does not exist; run `medmae prep` first")
        if not self.cache_dir.is_dir():
            raise NotADirectoryError(f"data.cache_dir {self.cache_dir} is not a directory")
        try:
            manifest = load_manifest(self.cache_dir)
        except (FileNotFoundError, ValueError) as e:
            raise type(e)(f"data.cache_dir: {e}") from e
        rows = manifest.rows
        self._same_version_on_every_rank(manifest.version)
        if self.manifest_version is not None and manifest.version != self.manifest_version:
            self._cache_changed(self.manifest_version, manifest.version, "this run set up its first split on")
        self.manifest_version = manifest.version
        if self._pinned_manifest is not None:
            self._check_pinned()
        if need_train:
            self.train_dataset = self._build_split("train", rows)
        if need_val:
            self.val_dataset = self._build_split("val", rows)

    # ------------------------------------------------------------------ the manifest version a run is pinned to

    def _cache_changed(self, pinned: str, now: str, what: str) -> None:
        head = (
            f"data.cache_dir {self.cache_dir}: manifest version {now} is not version {pinned} that {what} "
            "(`medmae prep` changed the cache since), so the run does not continue the same data stream"
        )
        if self.cache_changed == "error":
            raise CacheChangedError(f"{head}; restore that cache or, to train on the new one, set "
                                    "data.cache_changed: warn")
        logger.warning("%s (data.cache_changed: warn: going on with version %s)", head, now)

    def _check_pinned(self) -> None:
        assert self._pinned_manifest is not None and self.manifest_version is not None
        if self._pinned_manifest != self.manifest_version:
            pinned, self._pinned_manifest = self._pinned_manifest, None
            self._cache_changed(pinned, self.manifest_version, "the checkpoint was trained on")

    def _same_version_on_every_rank(self, version: str) -> None:
        """Under DDP every rank must index the same manifest: a prep swap between two ranks' setups
        would give them different indices (and a hang at the first collective). All ranks decide together."""
        trainer = self.trainer
        if trainer is None or int(getattr(trainer, "world_size", 1)) <= 1:
            return
        strategy = trainer.strategy
        same = strategy.broadcast(version, src=0) == version
        if not strategy.reduce_boolean_decision(same, all=True):
            raise CacheChangedError(
                f"data.cache_dir {self.cache_dir}: the ranks read different manifest versions at setup (`medmae "
                "prep` swapped the manifest while the run started); start the run again"
            )

    def state_dict(self) -> dict[str, Any]:
        """The stream position (see :class:`TrainStreamPosition`) and the manifest version trained on."""
        return {**super().state_dict(), "manifest_version": self.manifest_version}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume: the stream position, and the manifest version the checkpoint pins (checked against
        the cache at setup, or now when setup already ran, as Lightning does before restoring)."""
        super().load_state_dict(state_dict)
        pinned = state_dict.get("manifest_version")
        if isinstance(pinned, str) and pinned:
            self._pinned_manifest = pinned
            if self.manifest_version is not None:
                self._check_pinned()

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
            "pin_memory": self.pin_memory and torch.cuda.is_available(),
        }
        if self.num_workers > 0:
            kwargs["persistent_workers"] = self.persistent_workers
            kwargs["prefetch_factor"] = self.prefetch_factor
        return kwargs

    def train_sampler(self) -> EpochWeightedSampler:
        """A new sampler over the training index for this process's rank."""
        if self.train_dataset is None:
            self.setup("fit")
        assert self.train_dataset is not None
        replicas, rank = self._replicas()
        # Default epoch: one draw per indexed slice, but never less than one full batch per device
        # (draws are with replacement, so a tiny cache still trains instead of yielding no batch).
        samples = self.samples_per_epoch or max(len(self.train_dataset.index), self.batch_size * replicas)
        sampler = EpochWeightedSampler(
            self.train_dataset.index,
            samples,
            seed=self.seed,
            num_replicas=replicas,
            rank=rank,
            batch_size=self.batch_size,  # the loader drops partial batches: an epoch is whole batches
        )
        if len(sampler) < self.batch_size:
            raise ValueError(
                f"samples_per_epoch gives {len(sampler)} samples per device, fewer than batch_size "
                f"{self.batch_size}: no full batch per epoch (raise samples_per_epoch or lower batch_size)"
            )
        return sampler

    def check_batches_per_epoch(self, world_size: int) -> None:
        """Raise ``ValueError`` when an epoch would not give every one of ``world_size`` devices a full batch."""
        if self.train_dataset is None:
            self.setup("fit")
        assert self.train_dataset is not None
        samples = self.samples_per_epoch or max(len(self.train_dataset.index), self.batch_size * world_size)
        if samples // world_size < self.batch_size:
            raise ValueError(
                f"data.samples_per_epoch={samples} gives {samples // world_size} samples per device on "
                f"{world_size} device(s), fewer than data.batch_size={self.batch_size}: no full batch per epoch"
            )

    def pixels_on_device(self) -> bool:
        """Whether batches are finished on the device (``device_transforms``; null = on when training on CUDA)."""
        if self.volume_transform is not None:
            return False
        if self.device_transforms is not None:
            return self.device_transforms
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
        """GPU data path: flip, resize and scale the batch's stored-value crops on the device."""
        return finish_on_device(batch, self.transform)

    def val_dataloader(self) -> DataLoader | list:
        if self.val_dataset is None and "val" not in self.setup_report:
            self.setup("validate")
        if self.val_dataset is None:
            warnings.warn("the cache has no usable validation series: validation is skipped", stacklevel=2)
            return []
        return self._loader(self.val_dataset, shuffle=False, drop_last=False)
