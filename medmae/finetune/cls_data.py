"""Labelled series -> plane (slice-level) or series (series-level) batches for classification.

The input is the case table of :mod:`medmae.finetune.cases` with a class label per series::

    image,label,patient,split,modality
    scans/a.nii.gz,1,P001,train,CT
    dicom/P002_ct/,0,P002,,
    cache:3f9c2a...,1,P003,val,

* the label: column ``label_column`` (default ``label``) holding one of ``classes`` for ``binary``
  and ``multiclass``; for ``multilabel`` one 0/1 column per entry of ``classes``;
* ``image``, ``patient``, ``split`` and ``modality`` as for segmentation (one reader, one keyed-hash
  split independent of the fine-tuning seed, a patient on one side only).

Every plane goes through the export card's :class:`~medmae.data.plane_transform.PlanePreprocessor`
once at setup; nothing else resizes or rescales intensities. Training may add a random flip and a
random-resized crop on the preprocessed tensors. Errors name the CSV, the row and the column.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader

from medmae.data.options import DEFAULT_AUGMENT, AugmentOptions
from medmae.data.plane_transform import PlanePreprocessor
from medmae.finetune.cases import Case, LabelParser, check_modality, read_case_csv, split_cases
from medmae.finetune.encoders import parse_init, resolve_preprocessing
from medmae.finetune.samples import EpochDataset, PlaneDataset, TrainStream, augment
from medmae.finetune.volumes import Volume, VolumeError, read_image

logger = logging.getLogger(__name__)

TASKS = ("binary", "multiclass", "multilabel")
LEVELS = ("slice", "series")


def check_target(task: str, classes: Sequence[str | int] | None, where: str = "model") -> list[str]:
    """The checked class list of a task (binary defaults to ``["0", "1"]``); ValueError names the field."""
    if task not in TASKS:
        raise ValueError(f"{where}.task must be one of {TASKS}, got {task!r}")
    if classes is None:
        if task == "binary":
            return ["0", "1"]
        what = "the class values of the label column" if task == "multiclass" else "the label columns"
        raise ValueError(f"{where}.classes is required for task {task}: list {what}")
    out = [str(c).strip() for c in classes]
    if len(set(out)) != len(out) or any(not c for c in out):
        raise ValueError(f"{where}.classes must be distinct non-empty names, got {list(classes)!r}")
    need = {"binary": (2, 2), "multiclass": (2, 10_000), "multilabel": (1, 10_000)}[task]
    if not need[0] <= len(out) <= need[1]:
        raise ValueError(f"{where}.classes must list {'exactly 2' if task == 'binary' else f'at least {need[0]}'} "
                         f"entries for task {task}, got {out}")
    return out


def num_outputs(task: str, classes: Sequence[str]) -> int:
    """Logits of the head: one for binary, one per class / label otherwise."""
    return 1 if task == "binary" else len(classes)


def _same(value: str, name: str) -> bool:
    if value == name:
        return True
    try:
        return float(value) == float(name)
    except ValueError:
        return False


def target_parser(task: str, classes: Sequence[str], label_column: str = "label") -> tuple[list[str], LabelParser]:
    """Classification labels: the class index (binary / multiclass) or the 0/1 vector (multilabel)."""
    columns = list(classes) if task == "multilabel" else [label_column]

    def parse(row: dict[str, str], where: str, base: Path) -> tuple[float, ...]:
        if task == "multilabel":
            target = []
            for c in columns:
                v = row.get(c, "")
                if not (_same(v, "0") or _same(v, "1")):
                    raise VolumeError(
                        f"{where}: column {c!r} value {v!r} is not 0 or 1 (multilabel: one 0/1 column per class)"
                    )
                target.append(float(float(v)))
            return tuple(target)
        v = row.get(label_column, "")
        hits = [k for k, name in enumerate(classes) if _same(v, name)]
        if not hits:
            raise VolumeError(
                f"{where}: column {label_column!r} value {v!r} is outside the declared classes "
                f"{list(classes)} (data.classes)"
            )
        return (float(hits[0]),)

    return columns, parse


def read_label_csv(
    path: Path,
    task: str,
    classes: Sequence[str],
    label_column: str = "label",
    val_fraction: float = 0.2,
    split_seed: int = 0,
) -> list[Case]:
    """Parse and check a classification CSV (the shared case table); ``Case.label`` is the target."""
    columns, parse = target_parser(task, classes, label_column)
    hint = "data.classes" if task == "multilabel" else "data.label_column"
    return read_case_csv(Path(path), columns, parse, val_fraction, split_seed, missing_label_hint=hint)


@dataclass
class PreparedSeries:
    """A series after preprocessing: its planes on the encoder grid and its target."""

    images: torch.Tensor  # (N, C, H, W) float32 in [0, 1]
    target: torch.Tensor  # (T,) float32: class index (binary / multiclass) or 0/1 per label


def plane_indices(n: int, max_planes: int | None) -> list[int]:
    """All planes, or ``max_planes`` evenly spaced ones (first and last included)."""
    if max_planes is None or n <= max_planes:
        return list(range(n))
    return sorted({int(round(x)) for x in np.linspace(0, n - 1, max_planes)})


def prepare_series(case: Case, pre: PlanePreprocessor, csv_path: Path, modality: str | None, cache_dir: str | None,
                   max_planes: int | None) -> PreparedSeries:
    """Read one row's series (its ``modality``, else ``modality``, else prep's sidecar rule) onto the encoder grid."""
    try:
        volume = read_image(case.image, modality=case.modality or modality, cache_dir=cache_dir)
    except VolumeError as e:
        raise VolumeError(f"{csv_path}: {case.where}: {e}") from None
    return PreparedSeries(series_planes(volume, pre, max_planes), torch.tensor(case.label, dtype=torch.float32))


def series_planes(volume: Volume, pre: PlanePreprocessor, max_planes: int | None) -> torch.Tensor:
    """``(N, C, H, W)`` encoder input of a series: all planes, or ``max_planes`` evenly spaced ones
    (the same for fine-tuning validation and ``predict-cls``)."""
    pre = pre.for_input(volume.kind)  # a single 2D picture is its one plane under every axis
    n = pre.stack(volume.array).shape[0]
    images = pre.forward(volume.array, volume.intensity, volume.stats, plane_indices(n, max_planes),
                         spacing=volume.spacing)
    return images.float().contiguous()


class SeriesDataset(EpochDataset):
    """Series level: ``planes`` random planes of a series (all when it has fewer), one augmentation for all."""

    def __init__(self, series: list[PreparedSeries], planes: int | None, hflip_prob: float = 0.0,
                 crop_scale: tuple[float, float] = (1.0, 1.0), seed: int = 0,
                 extra: AugmentOptions | None = None) -> None:
        super().__init__(seed)
        self.series = series
        self.planes = planes
        self.hflip_prob = hflip_prob
        self.crop_scale = crop_scale
        self.extra = extra

    def __len__(self) -> int:
        return len(self.series)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item, rng = self.series[i], self.rng(i)
        images = item.images
        if self.planes is not None and images.shape[0] > self.planes:
            images = images[np.sort(rng.choice(images.shape[0], self.planes, replace=False))]
        images, _ = augment(images, rng, self.hflip_prob, self.crop_scale, extra=self.extra)
        return {"images": images, "target": item.target}


def collate_series(batch: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Series of different lengths -> all planes concatenated + the series index of each plane."""
    return {
        "image": torch.cat([b["images"] for b in batch]),
        "series": torch.cat([torch.full((b["images"].shape[0],), k, dtype=torch.long) for k, b in enumerate(batch)]),
        "target": torch.stack([b["target"] for b in batch]),
    }


class ClassificationDataModule(TrainStream, pl.LightningDataModule):
    """Labelled series from a CSV, preprocessed exactly as the encoder was pretrained.

    ``init``, ``card``, ``task``, ``classes`` and ``level`` are linked from the model by the CLI.

    Args:
        init: the encoder start (``medmae:DIR``, ``random:DIR``, ``timm:NAME``): gives the preprocessing.
        csv: the label CSV (see the module docstring).
        task: ``binary`` | ``multiclass`` | ``multilabel``.
        classes: class values of the label column (binary default ``["0", "1"]``, negative first);
            for multilabel the names of the 0/1 label columns.
        level: ``slice`` (each plane is a sample) or ``series`` (planes pooled per series).
        card: export folder giving the preprocessing when ``init`` is plain ``random``.
        label_column: the label column for binary / multiclass.
        modality: modality of every NIfTI image without a ``modality`` column, as ``medmae prep
            --nifti-modality MOD`` (``CT`` -> HU windows); None: each file's JSON sidecar / BIDS name
            decides, as in prep. Recorded in the checkpoint, so ``predict-cls`` reads inputs the same way.
        cache_dir: the medmae cache holding ``cache:SERIES_ID`` images.
        val_fraction: share of patients in validation when a row has no ``split``.
        max_planes: keep at most this many evenly spaced planes per series (memory bound); None = all.
        planes_per_series: series level, training: random planes drawn per series and step.
        batch_size: planes (slice level) or series (series level) per training batch.
        num_workers: DataLoader workers.
        samples_per_epoch: training samples per epoch, drawn with replacement; None = each once.
        hflip_prob: left-right flip probability in training (keep 0 for laterality labels).
        crop_scale: random-resized-crop area range in training; ``[1, 1]`` disables it.
        augment: ``data.augment`` in training after the crop and flip (rotation, zoom, bias field, gamma;
            pretraining's :class:`~medmae.data.options.AugmentOptions`; one draw per series at series
            level); off by default.
        split_seed: key of the hashed patient split (not the seed: runs that differ only in ``seed``
            validate on the same patients).
        seed: seed of augmentation and sampling.

    Training batches come from :class:`~medmae.finetune.samples.TrainStream`: the position of the last
    trained batch is saved in every checkpoint, so a resumed run continues the very stream.
    """

    def __init__(
        self,
        init: str,
        csv: str,
        task: str = "binary",
        classes: list[str | int] | None = None,
        level: str = "slice",
        *,
        card: str | None = None,
        label_column: str = "label",
        modality: str | None = None,
        cache_dir: str | None = None,
        val_fraction: float = 0.2,
        max_planes: int | None = None,
        planes_per_series: int | None = 16,
        batch_size: int = 32,
        num_workers: int = 0,
        samples_per_epoch: int | None = None,
        hflip_prob: float = 0.0,
        crop_scale: tuple[float, float] = (1.0, 1.0),
        augment: AugmentOptions = DEFAULT_AUGMENT,
        split_seed: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.classes = check_target(task, classes, "data")
        if level not in LEVELS:
            raise ValueError(f"data.level must be one of {LEVELS}, got {level!r}")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"data.val_fraction must be in [0, 1), got {val_fraction!r}")
        if not 0.0 < crop_scale[0] <= crop_scale[1] <= 1.0:
            raise ValueError(f"data.crop_scale must satisfy 0 < low <= high <= 1, got {list(crop_scale)!r}")
        if not 0.0 <= hflip_prob <= 1.0:
            raise ValueError(f"data.hflip_prob must be in [0, 1], got {hflip_prob!r}")
        if not isinstance(augment, AugmentOptions):
            raise TypeError(f"data.augment must be an AugmentOptions section, got {type(augment).__name__}")
        for name, value in (("max_planes", max_planes), ("planes_per_series", planes_per_series),
                            ("samples_per_epoch", samples_per_epoch)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"data.{name} must be an int >= 1 or null, got {value!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"data.batch_size must be an int >= 1, got {batch_size!r}")
        self.init, self.card, self.csv = init, card, csv
        self.task, self.level = task, level
        self.label_column, self.cache_dir = label_column, cache_dir
        self.modality = check_modality(modality, "data.modality")
        self.val_fraction, self.max_planes, self.planes_per_series = val_fraction, max_planes, planes_per_series
        self.batch_size, self.num_workers, self.samples_per_epoch = batch_size, num_workers, samples_per_epoch
        self.hflip_prob = float(hflip_prob)
        self.crop_scale = (float(crop_scale[0]), float(crop_scale[1]))
        self.augment = augment
        self.split_seed, self.seed = split_seed, seed
        self.preprocessing: PlanePreprocessor | None = None
        self.train_series: list[PreparedSeries] = []
        self.val_series: list[PreparedSeries] = []
        self.train_set: PlaneDataset | SeriesDataset | None = None

    def rows(self) -> list[Case]:
        return read_label_csv(Path(self.csv), self.task, self.classes, self.label_column, self.val_fraction,
                              self.split_seed)

    def input_record(self) -> dict[str, Any]:
        """How inputs were read, for the checkpoint (rules, no per-file value): ``predict-cls`` applies it."""
        return {"nifti_modality": self.modality, "max_planes": self.max_planes}

    def setup(self, stage: str | None = None) -> None:
        if self.preprocessing is not None:
            return
        pre = resolve_preprocessing(parse_init(self.init, self.card))
        train, val = split_cases(self.rows(), str(self.csv))  # every row is checked before any volume is read
        csv_path = Path(self.csv)
        self.train_series = [self._prepare(r, pre, csv_path) for r in train]
        self.val_series = [self._prepare(r, pre, csv_path) for r in val]
        self.preprocessing = pre
        self._warn_uncovered("training", self.train_series)
        if self.val_series:
            self._warn_uncovered("validation", self.val_series)
        logger.info("classification data: %s", self.describe())

    def _prepare(self, case: Case, pre: PlanePreprocessor, csv_path: Path) -> PreparedSeries:
        return prepare_series(case, pre, csv_path, self.modality, self.cache_dir, self.max_planes)

    def _warn_uncovered(self, name: str, series: list[PreparedSeries]) -> None:
        """Say when a split lacks a class (AUROC is then undefined for it)."""
        targets = torch.stack([s.target for s in series])
        if self.task == "multilabel":
            absent = [c for k, c in enumerate(self.classes) if targets[:, k].min() == targets[:, k].max()]
        else:
            present = set(targets[:, 0].long().tolist())
            absent = [c for k, c in enumerate(self.classes) if k not in present]
        if absent:
            logger.warning("%s series do not cover every class/label state: %s", name, absent)

    def train_dataloader(self) -> DataLoader:
        if self.train_set is None:
            if self.level == "slice":
                self.train_set = PlaneDataset([s.images for s in self.train_series], self.crop_scale, self.hflip_prob,
                                              self.seed, targets=[s.target for s in self.train_series],
                                              extra=self.augment)
            else:
                self.train_set = SeriesDataset(self.train_series, self.planes_per_series, self.hflip_prob,
                                               self.crop_scale, self.seed, self.augment)
        data = self.train_set
        n = self.samples_per_epoch or max(len(data), self.batch_size)
        collate = collate_series if self.level == "series" else None
        return self.train_loader(data, n, self.batch_size, self.num_workers, self.seed, collate)

    def val_dataloader(self) -> DataLoader | list:
        if not self.val_series:
            return []
        return DataLoader(SeriesDataset(self.val_series, None), batch_size=1, collate_fn=collate_series)

    def describe(self) -> dict[str, Any]:
        """What may be logged: counts only (no paths, no header data)."""
        return {
            "train_series": len(self.train_series),
            "val_series": len(self.val_series),
            "train_planes": sum(int(s.images.shape[0]) for s in self.train_series),
            "level": self.level,
            "task": self.task,
        }
