"""Labelled series -> plane (slice-level) or series (series-level) batches for classification.

The input is a CSV with one row per series::

    image,label,patient,split
    scans/a.nii.gz,1,P001,train
    dicom/P002_ct/,0,P002,
    cache:3f9c2a...,1,P003,val

* ``image``: a NIfTI file, a DICOM series folder or ``cache:SERIES_ID`` (with ``data.cache_dir``);
  relative paths resolve against the CSV's folder.
* the label: column ``label_column`` (default ``label``) holding one of ``classes`` for ``binary``
  and ``multiclass``; for ``multilabel`` one 0/1 column per entry of ``classes``.
* ``patient`` (optional): the split is per patient, so no patient is on both sides.
* ``split`` (optional, ``train``/``val``): wins over the hashed split of ``val_fraction``.
* ``modality`` (optional): ``CT`` for NIfTI in HU (DICOM folders and the cache know theirs).

Every plane goes through the export card's :class:`~medmae.export.preprocessing.PlanePreprocessor`
once at setup; nothing else resizes or rescales intensities. Training may add a random flip and a
random-resized crop on the preprocessed tensors. Errors name the CSV, the row and the column.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from medmae.data.transforms import random_resized_crop_box
from medmae.export.preprocessing import PlanePreprocessor
from medmae.finetune.encoders import parse_init, patient_split, resolve_preprocessing
from medmae.finetune.volumes import VolumeError, read_image

logger = logging.getLogger(__name__)

TASKS = ("binary", "multiclass", "multilabel")
LEVELS = ("slice", "series")
SPLITS = ("train", "val")


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


@dataclass(frozen=True)
class ClsRow:
    """One labelled series of the CSV: its reference as resolved, target, patient key and split."""

    row: int
    image: str
    target: tuple[float, ...]
    patient: str
    split: str
    modality: str


def read_label_csv(
    path: Path,
    task: str,
    classes: Sequence[str],
    label_column: str = "label",
    val_fraction: float = 0.2,
    seed: int = 0,
    modality: str = "OT",
) -> list[ClsRow]:
    """Parse and check a label CSV; every error is one line naming the CSV, row and column.

    Targets: the class index for binary / multiclass (one value), the 0/1 vector for multilabel.
    """
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            columns = [c.strip() for c in (reader.fieldnames or [])]
    except FileNotFoundError:
        raise VolumeError(f"{path}: label CSV not found") from None
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise VolumeError(f"{path}: unreadable label CSV ({e.__class__.__name__}: {e})") from None
    if not rows:
        raise VolumeError(f"{path}: no rows (the CSV is empty)")
    rows = [{(k or "").strip(): (v or "").strip() if isinstance(v, str) else "" for k, v in r.items()} for r in rows]
    if "image" not in columns:
        raise VolumeError(f"{path}: missing column 'image' (columns: {columns})")
    label_columns = list(classes) if task == "multilabel" else [label_column]
    missing = [c for c in label_columns if c not in columns]
    if missing:
        field = "data.classes" if task == "multilabel" else "data.label_column"
        raise VolumeError(f"{path}: missing label column {missing[0]!r} ({field}; columns: {columns})")
    base = path.parent
    out = []
    for i, r in enumerate(rows, start=2):  # row 1 is the header
        where = f"{path}: row {i}"
        image = r.get("image", "")
        if not image:
            raise VolumeError(f"{where}: column 'image' is empty")
        if image.startswith("cache:"):
            resolved = image
        else:
            p = Path(image) if Path(image).is_absolute() else base / image
            if not p.exists():
                raise VolumeError(f"{where}: image {image!r} points at nothing")
            resolved = str(p)
        if task == "multilabel":
            target = []
            for c in label_columns:
                v = r.get(c, "")
                if _same(v, "0") or _same(v, "1"):
                    target.append(float(float(v)))
                else:
                    raise VolumeError(
                        f"{where}: column {c!r} value {v!r} is not 0 or 1 (multilabel: one 0/1 column per class)"
                    )
        else:
            v = r.get(label_column, "")
            hits = [k for k, name in enumerate(classes) if _same(v, name)]
            if not hits:
                raise VolumeError(
                    f"{where}: column {label_column!r} value {v!r} is outside the declared classes "
                    f"{list(classes)} (data.classes)"
                )
            target = [float(hits[0])]
        patient = r.get("patient", "") or image
        split = r.get("split", "").lower() or patient_split(patient, val_fraction, seed)
        if split not in SPLITS:
            raise VolumeError(f"{where}: column 'split' must be train or val, got {split!r}")
        out.append(ClsRow(i, resolved, tuple(target), patient, split, r.get("modality", "") or modality))
    _check_patients(path, out)
    return out


def _check_patients(path: Path, rows: list[ClsRow]) -> None:
    seen: dict[str, tuple[str, int]] = {}
    for r in rows:
        first = seen.setdefault(r.patient, (r.split, r.row))
        if first[0] != r.split:
            raise VolumeError(
                f"{path}: row {r.row}: patient is in split {r.split!r} but row {first[1]} puts it in {first[0]!r} "
                "(a patient must be on one side only)"
            )


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


def prepare_series(row: ClsRow, pre: PlanePreprocessor, csv_path: Path, cache_dir: str | None,
                   max_planes: int | None) -> PreparedSeries:
    try:
        volume = read_image(row.image, modality=row.modality, cache_dir=cache_dir)
    except VolumeError as e:
        raise VolumeError(f"{csv_path}: row {row.row}: {e}") from None
    n = pre.stack(volume.array).shape[0]
    images = pre.planes(
        volume.array, volume.intensity, volume.stats, plane_indices(n, max_planes), spacing=volume.spacing
    )
    return PreparedSeries(images.float().contiguous(), torch.tensor(row.target, dtype=torch.float32))


def augment(images: torch.Tensor, rng: np.random.Generator, hflip_prob: float,
            crop_scale: tuple[float, float]) -> torch.Tensor:
    """Random-resized crop (back to the encoder grid) and left-right flip of ``(..., C, H, W)`` planes."""
    h, w = images.shape[-2:]
    if crop_scale[0] < 1.0:
        box = random_resized_crop_box(rng, (h, w), crop_scale)
        crop = images[..., box.top : box.top + box.height, box.left : box.left + box.width]
        flat = crop.reshape(-1, *crop.shape[-3:])
        images = F.interpolate(flat, size=(h, w), mode="bilinear", align_corners=False).reshape(images.shape)
    if hflip_prob > 0 and rng.random() < hflip_prob:
        images = images.flip(-1)
    return images.contiguous()


class _Augmented(Dataset):
    def __init__(self, series: list[PreparedSeries], hflip_prob: float, crop_scale: tuple[float, float],
                 seed: int) -> None:
        self.series = series
        self.hflip_prob = hflip_prob
        self.crop_scale = crop_scale
        self.seed = seed
        self.epoch = 0  # set by the module at each epoch start: a sample is f(seed, epoch, index)

    def rng(self, i: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, i])


class PlaneDataset(_Augmented):
    """Slice level: every plane is a sample labelled with its series' target."""

    def __init__(self, series: list[PreparedSeries], hflip_prob: float, crop_scale: tuple[float, float],
                 seed: int) -> None:
        super().__init__(series, hflip_prob, crop_scale, seed)
        self.items = [(s, z) for s, item in enumerate(series) for z in range(item.images.shape[0])]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        s, z = self.items[i]
        image = augment(self.series[s].images[z], self.rng(i), self.hflip_prob, self.crop_scale)
        return {"image": image, "target": self.series[s].target}


class SeriesDataset(_Augmented):
    """Series level: ``planes`` random planes of a series (all when it has fewer), one augmentation for all."""

    def __init__(self, series: list[PreparedSeries], planes: int | None, hflip_prob: float = 0.0,
                 crop_scale: tuple[float, float] = (1.0, 1.0), seed: int = 0) -> None:
        super().__init__(series, hflip_prob, crop_scale, seed)
        self.planes = planes

    def __len__(self) -> int:
        return len(self.series)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item, rng = self.series[i], self.rng(i)
        images = item.images
        if self.planes is not None and images.shape[0] > self.planes:
            images = images[np.sort(rng.choice(images.shape[0], self.planes, replace=False))]
        return {"images": augment(images, rng, self.hflip_prob, self.crop_scale), "target": item.target}


def collate_series(batch: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Series of different lengths -> all planes concatenated + the series index of each plane."""
    return {
        "image": torch.cat([b["images"] for b in batch]),
        "series": torch.cat([torch.full((b["images"].shape[0],), k, dtype=torch.long) for k, b in enumerate(batch)]),
        "target": torch.stack([b["target"] for b in batch]),
    }


class ClassificationDataModule(pl.LightningDataModule):
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
        modality: modality of NIfTI images without a ``modality`` column (``CT`` -> HU windows).
        cache_dir: the medmae cache holding ``cache:SERIES_ID`` images.
        val_fraction: share of patients in validation when a row has no ``split``.
        max_planes: keep at most this many evenly spaced planes per series (memory bound); None = all.
        planes_per_series: series level, training: random planes drawn per series and step.
        batch_size: planes (slice level) or series (series level) per training batch.
        num_workers: DataLoader workers.
        samples_per_epoch: training samples per epoch, drawn with replacement; None = each once.
        hflip_prob: left-right flip probability in training (keep 0 for laterality labels).
        crop_scale: random-resized-crop area range in training; ``[1, 1]`` disables it.
        seed: seed of the hashed split and of augmentation.
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
        modality: str = "OT",
        cache_dir: str | None = None,
        val_fraction: float = 0.2,
        max_planes: int | None = None,
        planes_per_series: int | None = 16,
        batch_size: int = 32,
        num_workers: int = 0,
        samples_per_epoch: int | None = None,
        hflip_prob: float = 0.0,
        crop_scale: tuple[float, float] = (1.0, 1.0),
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
        for name, value in (("max_planes", max_planes), ("planes_per_series", planes_per_series),
                            ("samples_per_epoch", samples_per_epoch)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"data.{name} must be an int >= 1 or null, got {value!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"data.batch_size must be an int >= 1, got {batch_size!r}")
        self.init, self.card, self.csv = init, card, csv
        self.task, self.level = task, level
        self.label_column, self.modality, self.cache_dir = label_column, modality, cache_dir
        self.val_fraction, self.max_planes, self.planes_per_series = val_fraction, max_planes, planes_per_series
        self.batch_size, self.num_workers, self.samples_per_epoch = batch_size, num_workers, samples_per_epoch
        self.hflip_prob = float(hflip_prob)
        self.crop_scale = (float(crop_scale[0]), float(crop_scale[1]))
        self.seed = seed
        self.preprocessing: PlanePreprocessor | None = None
        self.train_series: list[PreparedSeries] = []
        self.val_series: list[PreparedSeries] = []
        self.train_set: _Augmented | None = None

    def rows(self) -> list[ClsRow]:
        return read_label_csv(Path(self.csv), self.task, self.classes, self.label_column, self.val_fraction,
                              self.seed, self.modality)

    def setup(self, stage: str | None = None) -> None:
        if self.preprocessing is not None:
            return
        pre = resolve_preprocessing(parse_init(self.init, self.card))
        rows = self.rows()  # every row is checked before any volume is read
        train = [r for r in rows if r.split == "train"]
        val = [r for r in rows if r.split == "val"]
        if not train:
            raise VolumeError(f"{self.csv}: no training row: every patient fell into validation (lower val_fraction)")
        csv_path = Path(self.csv)
        self.train_series = [prepare_series(r, pre, csv_path, self.cache_dir, self.max_planes) for r in train]
        self.val_series = [prepare_series(r, pre, csv_path, self.cache_dir, self.max_planes) for r in val]
        self.preprocessing = pre
        self._warn_uncovered("training", self.train_series)
        if self.val_series:
            self._warn_uncovered("validation", self.val_series)
        logger.info("classification data: %s", self.describe())

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
                self.train_set = PlaneDataset(self.train_series, self.hflip_prob, self.crop_scale, self.seed)
            else:
                self.train_set = SeriesDataset(self.train_series, self.planes_per_series, self.hflip_prob,
                                               self.crop_scale, self.seed)
        data = self.train_set
        n = self.samples_per_epoch or max(len(data), self.batch_size)
        g = torch.Generator().manual_seed(self.seed)
        sampler = torch.utils.data.RandomSampler(data, replacement=n != len(data), num_samples=n, generator=g)
        return DataLoader(data, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers,
                          drop_last=n >= self.batch_size, collate_fn=collate_series if self.level == "series" else None)

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
