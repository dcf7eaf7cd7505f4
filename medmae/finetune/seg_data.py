"""Labelled volumes -> 2D / 2.5D plane batches for segmentation fine-tuning.

Cases come from a CSV (``image,label[,patient][,split]``; relative paths resolve against the CSV's
folder) or a folder convention (``DIR/images/NAME.nii.gz`` + ``DIR/labels/NAME.nii.gz``). Images may be
NIfTI files, DICOM series folders or ``cache:SERIES_ID``; labels are NIfTI on the image's grid.

Splits are per patient: an explicit ``split`` column (``train``/``val``) wins; otherwise a keyed hash
of the ``patient`` column (or of the case, when there is none) puts ``val_fraction`` of patients in
validation, so no patient is on both sides.

Every plane goes through the export card's :class:`~medmae.export.preprocessing.PlanePreprocessor`
once at setup (the same code inference uses). Training samples are planes with labelled foreground,
augmented by a random-resized crop and optional flip applied to image and label together;
validation yields whole volumes, scored in :mod:`medmae.finetune.segment` on planes stacked back
into the volume. With a 3D export the same module trains on random 3D patches instead
(:mod:`medmae.finetune.seg_data3d`).
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from medmae.data.transforms import random_resized_crop_box
from medmae.export.preprocessing import PlanePreprocessor
from medmae.export.volume_preprocessing import VolumePreprocessor
from medmae.finetune.encoders import Preprocessor, parse_init, patient_split, resolve_preprocessing
from medmae.finetune.seg_data3d import PatchDataset, PreparedVolume, prepare_volume_case
from medmae.finetune.volumes import NIFTI_SUFFIXES, VolumeError, read_image, read_label

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SegCase:
    """One labelled volume: references as written by the user, its patient key and split."""

    row: int
    image: str
    label: str
    patient: str
    split: str


def read_cases_csv(path: Path, val_fraction: float, seed: int) -> list[SegCase]:
    """Parse a case CSV; errors name the file, row and column."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except FileNotFoundError:
        raise VolumeError(f"{path}: case CSV not found") from None
    if not rows:
        raise VolumeError(f"{path}: no cases (an empty CSV)")
    for column in ("image", "label"):
        if column not in rows[0]:
            raise VolumeError(f"{path}: missing column '{column}' (columns: {list(rows[0])})")
    base = path.parent
    cases = []
    for i, r in enumerate(rows, start=2):  # row 1 is the header
        image, label = (r.get("image") or "").strip(), (r.get("label") or "").strip()
        if not image or not label:
            raise VolumeError(f"{path}: row {i}: empty 'image' or 'label'")
        label_path = Path(label) if Path(label).is_absolute() else base / label
        if not label_path.is_file():
            raise VolumeError(f"{path}: row {i}: label {label!r} points at nothing")
        if not image.startswith("cache:"):
            image_path = Path(image) if Path(image).is_absolute() else base / image
            if not image_path.exists():
                raise VolumeError(f"{path}: row {i}: image {image!r} points at nothing")
            image = str(image_path)
        patient = (r.get("patient") or "").strip() or image
        split = (r.get("split") or "").strip().lower() or patient_split(patient, val_fraction, seed)
        if split not in ("train", "val"):
            raise VolumeError(f"{path}: row {i}: split must be train or val, got {split!r}")
        cases.append(SegCase(i, image, str(label_path), patient, split))
    return cases


def read_cases_folder(folder: Path, val_fraction: float, seed: int) -> list[SegCase]:
    """``folder/images/NAME.nii[.gz]`` paired with ``folder/labels/NAME.nii[.gz]``."""
    images, labels = folder / "images", folder / "labels"
    if not images.is_dir() or not labels.is_dir():
        raise VolumeError(f"{folder}: expected sub-folders images/ and labels/")

    def stem(p: Path) -> str:
        return next(p.name[: -len(s)] for s in NIFTI_SUFFIXES if p.name.lower().endswith(s))

    label_of = {stem(p): p for p in labels.iterdir() if p.name.lower().endswith(NIFTI_SUFFIXES)}
    cases = []
    for i, p in enumerate(sorted(q for q in images.iterdir() if q.name.lower().endswith(NIFTI_SUFFIXES)), start=1):
        name = stem(p)
        if name not in label_of:
            raise VolumeError(f"{folder}: image {p.name} has no label labels/{name}.nii[.gz]")
        cases.append(SegCase(i, str(p), str(label_of[name]), name, patient_split(name, val_fraction, seed)))
    if not cases:
        raise VolumeError(f"{folder}: no NIfTI images in images/")
    return cases


@dataclass
class PreparedCase:
    """A case after preprocessing: encoder-grid planes, labels on that grid, and the original label stack."""

    images: torch.Tensor  # (Z, C, H, W) float32
    labels: torch.Tensor  # (Z, H, W) int64 on the encoder grid
    label_stack: np.ndarray  # (Z, h, w) uint8 planes at the original resolution
    plane_shape: tuple[int, int]


def prepare_case(
    case: SegCase, pre: PlanePreprocessor, num_classes: int, modality: str, cache_dir: str | None
) -> PreparedCase:
    image = read_image(case.image, modality=modality, cache_dir=cache_dir)
    label = read_label(case.label, image, num_classes)
    stack = np.ascontiguousarray(pre.stack(label))
    return PreparedCase(
        images=pre.planes(image.array, image.intensity, image.stats, spacing=image.spacing),
        labels=pre.labels(label),
        label_stack=stack,
        plane_shape=tuple(stack.shape[1:]),  # type: ignore[arg-type]
    )


class PlaneDataset(Dataset):
    """Training planes with foreground, augmented jointly (random-resized crop, flip) per (epoch, index).

    ``epoch`` is set by the fine-tuning module at each epoch start, so augmentations differ per epoch
    and a sample is a pure function of (seed, epoch, index).
    """

    def __init__(
        self,
        cases: list[PreparedCase],
        crop_scale: tuple[float, float],
        hflip_prob: float,
        seed: int,
        include_empty: bool = False,
    ) -> None:
        self.cases = cases
        self.items = [
            (c, z)
            for c, case in enumerate(cases)
            for z in range(case.labels.shape[0])
            if include_empty or bool(case.labels[z].any())
        ]
        if not self.items:
            raise VolumeError("no training plane holds a labelled structure (all labels are background)")
        self.crop_scale = crop_scale
        self.hflip_prob = hflip_prob
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        c, z = self.items[i]
        image, label = self.cases[c].images[z], self.cases[c].labels[z]
        rng = np.random.default_rng([self.seed, self.epoch, i])
        h, w = label.shape
        if self.crop_scale[0] < 1.0:
            box = random_resized_crop_box(rng, (h, w), self.crop_scale)
            image = image[:, box.top : box.top + box.height, box.left : box.left + box.width]
            label = label[box.top : box.top + box.height, box.left : box.left + box.width]
            image = F.interpolate(image[None], size=(h, w), mode="bilinear", align_corners=False)[0]
            label = F.interpolate(label[None, None].float(), size=(h, w), mode="nearest-exact")[0, 0].long()
        if rng.random() < self.hflip_prob:
            image, label = image.flip(-1), label.flip(-1)
        return {"image": image.contiguous(), "label": label[None].contiguous()}


class VolumeDataset(Dataset):
    """Validation: one whole case per item."""

    def __init__(self, cases: list[PreparedCase] | list[PreparedVolume]) -> None:
        self.cases = cases

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, i: int) -> PreparedCase | PreparedVolume:
        return self.cases[i]


def _single(batch: list) -> PreparedCase | PreparedVolume:
    return batch[0]


class SegmentationDataModule(pl.LightningDataModule):
    """Plane batches (2D encoders) or 3D patches (3D encoders) from labelled volumes, preprocessed exactly
    as the encoder was pretrained.

    Args:
        init: the encoder start (``medmae:DIR``, ``random:DIR``, ``timm:NAME``); linked from
            ``model.init`` by the CLI so data and model read the same card.
        num_classes: classes including background (label values ``0 .. num_classes - 1``).
        csv: case CSV (``image,label[,patient][,split]``); or
        folder: ``images/`` + ``labels/`` folder of NIfTI pairs.
        card: export folder giving the preprocessing when ``init`` is plain ``random``.
        modality: modality of NIfTI images (``CT`` -> HU windows; anything else -> percentiles).
        cache_dir: cache holding ``cache:SERIES_ID`` images.
        val_fraction: share of patients in validation when the CSV has no ``split`` column.
        max_train_cases: use only the first N training cases (few-label experiments); None = all.
        batch_size, num_workers: DataLoader settings for training planes.
        samples_per_epoch: training planes per epoch (drawn with replacement); None = each plane once.
            3D: patches per epoch; None = one per training volume (at least ``batch_size``).
        crop_scale: random-resized-crop area range for training planes ((1, 1) disables); 3D: the
            patch's volume fraction before it is resized to the card's size.
        hflip_prob: left-right flip probability (keep 0 when labels are lateral, e.g. left/right organs).
        include_empty_planes: also train on planes without any labelled structure (2D).
        foreground_prob: 3D: probability that a training patch holds a labelled voxel (the rest are
            placed uniformly).
        seed: seed of splits and augmentation.
    """

    def __init__(
        self,
        init: str,
        num_classes: int,
        csv: str | None = None,
        folder: str | None = None,
        *,
        card: str | None = None,
        modality: str = "OT",
        cache_dir: str | None = None,
        val_fraction: float = 0.2,
        max_train_cases: int | None = None,
        batch_size: int = 8,
        num_workers: int = 0,
        samples_per_epoch: int | None = None,
        crop_scale: tuple[float, float] = (0.5, 1.0),
        hflip_prob: float = 0.0,
        include_empty_planes: bool = False,
        foreground_prob: float = 0.5,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if (csv is None) == (folder is None):
            raise ValueError("give exactly one of data.csv and data.folder")
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"data.num_classes must be an int >= 2 (background included), got {num_classes!r}")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"data.val_fraction must be in [0, 1), got {val_fraction!r}")
        if not 0.0 < crop_scale[0] <= crop_scale[1] <= 1.0:
            raise ValueError(f"data.crop_scale must satisfy 0 < low <= high <= 1, got {crop_scale!r}")
        if not 0.0 <= foreground_prob <= 1.0:
            raise ValueError(f"data.foreground_prob must be in [0, 1], got {foreground_prob!r}")
        if max_train_cases is not None and max_train_cases < 1:
            raise ValueError(f"data.max_train_cases must be >= 1, got {max_train_cases!r}")
        self.init = init
        self.card = card
        self.num_classes = num_classes
        self.csv, self.folder = csv, folder
        self.modality = modality
        self.cache_dir = cache_dir
        self.val_fraction = val_fraction
        self.max_train_cases = max_train_cases
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.samples_per_epoch = samples_per_epoch
        self.crop_scale = (float(crop_scale[0]), float(crop_scale[1]))
        self.hflip_prob = float(hflip_prob)
        self.include_empty_planes = include_empty_planes
        self.foreground_prob = float(foreground_prob)
        self.seed = seed
        self.preprocessing: Preprocessor | None = None
        self.train_cases: list = []
        self.train_set: PlaneDataset | PatchDataset | None = None
        self.val_cases: list = []

    def cases(self) -> list[SegCase]:
        if self.csv is not None:
            return read_cases_csv(Path(self.csv), self.val_fraction, self.seed)
        return read_cases_folder(Path(self.folder), self.val_fraction, self.seed)  # type: ignore[arg-type]

    def setup(self, stage: str | None = None) -> None:
        if self.preprocessing is not None:
            return
        self.preprocessing = resolve_preprocessing(parse_init(self.init, self.card))
        cases = self.cases()
        train = [c for c in cases if c.split == "train"]
        val = [c for c in cases if c.split == "val"]
        if not train:
            raise VolumeError("no training case: every case fell into validation (lower val_fraction)")
        if self.max_train_cases is not None:
            train = train[: self.max_train_cases]
        self.train_cases = [self._prepare(c) for c in train]
        self.val_cases = [self._prepare(c) for c in val]
        logger.info("segmentation data: %d training and %d validation volumes", len(train), len(val))

    def _prepare(self, case: SegCase) -> PreparedCase | PreparedVolume:
        pre = self.preprocessing
        if isinstance(pre, VolumePreprocessor):
            return prepare_volume_case(case.image, case.label, pre, self.num_classes, self.modality, self.cache_dir)
        assert isinstance(pre, PlanePreprocessor)
        return prepare_case(case, pre, self.num_classes, self.modality, self.cache_dir)

    def train_dataloader(self) -> DataLoader:
        if isinstance(self.preprocessing, VolumePreprocessor):
            return self._patch_dataloader(self.preprocessing)
        if self.train_set is None:
            self.train_set = PlaneDataset(
                self.train_cases, self.crop_scale, self.hflip_prob, self.seed, self.include_empty_planes
            )
        data = self.train_set
        n = self.samples_per_epoch or max(len(data), self.batch_size)
        g = torch.Generator().manual_seed(self.seed)
        sampler = torch.utils.data.RandomSampler(data, replacement=n != len(data), num_samples=n, generator=g)
        return DataLoader(
            data,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            drop_last=n >= self.batch_size,
            persistent_workers=False,
        )

    def _patch_dataloader(self, pre: VolumePreprocessor) -> DataLoader:
        """3D: ``samples_per_epoch`` distinct random patches per epoch (each index its own draw)."""
        if self.train_set is None:
            n = self.samples_per_epoch or max(len(self.train_cases), self.batch_size)
            self.train_set = PatchDataset(
                self.train_cases, n, pre.size, self.crop_scale, self.hflip_prob, self.foreground_prob, self.seed
            )
        g = torch.Generator().manual_seed(self.seed)
        data = self.train_set
        return DataLoader(
            data,
            batch_size=self.batch_size,
            sampler=torch.utils.data.RandomSampler(data, generator=g),
            num_workers=self.num_workers,
            drop_last=len(data) >= self.batch_size,
            persistent_workers=False,
        )

    def val_dataloader(self) -> DataLoader | list:
        if not self.val_cases:
            return []
        return DataLoader(VolumeDataset(self.val_cases), batch_size=1, collate_fn=_single)
