"""Labelled volumes -> 2D / 2.5D plane batches for segmentation fine-tuning.

Cases come from the case table of :mod:`medmae.finetune.cases` (a CSV ``image,label[,patient][,split]
[,modality]``, or the folder convention ``DIR/images/NAME.nii.gz`` + ``DIR/labels/NAME.nii.gz``), the
same reader, checks and per-patient keyed-hash split as classification. Images may be NIfTI files,
DICOM series folders or ``cache:SERIES_ID``; labels are NIfTI on the image's grid. NIfTI modality is
decided by prep's rule: the row's ``modality``, else ``data.modality``, else the JSON sidecar, else a BIDS
suffix, else ``OT`` (:func:`medmae.finetune.volumes.read_nifti_image`).

Every plane goes through the export card's :class:`~medmae.data.plane_transform.PlanePreprocessor`
once at setup (:mod:`medmae.finetune.seg_data2d`; the same code inference uses). Training samples are
planes with labelled foreground, augmented by a random-resized crop, an optional flip and optional
``data.augment`` (rotation, zoom, bias field, gamma) applied to image and label together; validation
yields whole volumes, scored in :mod:`medmae.finetune.segment` on planes stacked back into the volume.
With a 3D export the same module trains on random 3D patches instead (:mod:`medmae.finetune.seg_data3d`);
:mod:`medmae.finetune.dims` holds what differs, chosen once by the card.
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning.pytorch as pl
from torch.utils.data import DataLoader, Dataset

from medmae.data.options import DEFAULT_AUGMENT, AugmentOptions
from medmae.finetune.cases import Case, check_modality, label_map_parser, read_case_csv, read_case_folder, split_cases
from medmae.finetune.dims import Dims, dims_for
from medmae.finetune.encoders import Preprocessor, parse_init, resolve_preprocessing
from medmae.finetune.samples import PlaneDataset, TrainStream
from medmae.finetune.seg_data2d import PreparedCase as PreparedCase  # re-exported (the 2D half's)
from medmae.finetune.seg_data2d import prepare_case as prepare_case
from medmae.finetune.seg_data3d import PatchDataset, PreparedVolume
from medmae.finetune.volumes import VolumeError

logger = logging.getLogger(__name__)


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


class SegmentationDataModule(TrainStream, pl.LightningDataModule):
    """Plane batches (2D encoders) or 3D patches (3D encoders) from labelled volumes, preprocessed exactly
    as the encoder was pretrained.

    Args:
        init: the encoder start (``medmae:DIR``, ``random:DIR``, ``timm:NAME``); linked from
            ``model.init`` by the CLI so data and model read the same card.
        num_classes: classes including background (label values ``0 .. num_classes - 1``).
        csv: case CSV (``image,label[,patient][,split]``); or
        folder: ``images/`` + ``labels/`` folder of NIfTI pairs.
        card: export folder giving the preprocessing when ``init`` is plain ``random``.
        modality: modality of every NIfTI image, as ``medmae prep --nifti-modality MOD`` (``CT`` -> HU
            windows; anything else -> percentiles); None: each file's JSON sidecar / BIDS name decides,
            as in prep. A CSV ``modality`` column sets it per row. Recorded in the checkpoint, so
            ``predict-seg`` reads its inputs the same way.
        cache_dir: cache holding ``cache:SERIES_ID`` images.
        val_fraction: share of patients in validation when the CSV has no ``split`` column.
        max_train_cases: use only the first N training cases (few-label experiments); None = all.
        batch_size, num_workers: DataLoader settings for training planes.
        samples_per_epoch: training planes per epoch (drawn with replacement); None = each plane once.
            3D: patches per epoch; None = one per training volume (at least ``batch_size``).
        crop_scale: random-resized-crop area range for training planes ((1, 1) disables); 3D: the
            patch's volume fraction before it is resized to the card's size.
        hflip_prob: left-right flip probability (keep 0 when labels are lateral, e.g. left/right organs).
        augment: ``data.augment`` of training planes after the crop and flip — rotation, zoom (the label
            follows, nearest neighbour), bias field and gamma, the options of pretraining's ``data.augment``
            (:class:`~medmae.data.options.AugmentOptions`); off by default. 2D / 2.5D only.
        include_empty_planes: also train on planes without any labelled structure (2D).
        foreground_prob: 3D: probability that a training patch holds a labelled voxel (the rest are
            placed uniformly).
        split_seed: key of the hashed patient split (not the seed: runs that differ only in ``seed``
            validate on the same patients).
        seed: seed of augmentation and sampling.

    Training batches come from :class:`~medmae.finetune.samples.TrainStream`: the position of the last
    trained batch is saved in every checkpoint, so a resumed run continues the very stream.
    """

    def __init__(
        self,
        init: str,
        num_classes: int,
        csv: str | None = None,
        folder: str | None = None,
        *,
        card: str | None = None,
        modality: str | None = None,
        cache_dir: str | None = None,
        val_fraction: float = 0.2,
        max_train_cases: int | None = None,
        batch_size: int = 8,
        num_workers: int = 0,
        samples_per_epoch: int | None = None,
        crop_scale: tuple[float, float] = (0.5, 1.0),
        hflip_prob: float = 0.0,
        augment: AugmentOptions = DEFAULT_AUGMENT,
        include_empty_planes: bool = False,
        foreground_prob: float = 0.5,
        split_seed: int = 0,
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
        self.modality = check_modality(modality, "data.modality")
        self.cache_dir = cache_dir
        self.val_fraction = val_fraction
        self.max_train_cases = max_train_cases
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.samples_per_epoch = samples_per_epoch
        self.crop_scale = (float(crop_scale[0]), float(crop_scale[1]))
        self.hflip_prob = float(hflip_prob)
        if not isinstance(augment, AugmentOptions):
            raise TypeError(f"data.augment must be an AugmentOptions section, got {type(augment).__name__}")
        self.augment = augment
        self.include_empty_planes = include_empty_planes
        self.foreground_prob = float(foreground_prob)
        self.split_seed = split_seed
        self.seed = seed
        self.preprocessing: Preprocessor | None = None
        self.dims: Dims | None = None  # planes (2D) or volumes (3D): chosen once by the card at setup
        self.train_cases: list = []
        self.train_set: PlaneDataset | PatchDataset | None = None
        self.val_cases: list = []

    def cases(self) -> list[Case]:
        if self.csv is not None:
            columns, parse = label_map_parser()
            return read_case_csv(Path(self.csv), columns, parse, self.val_fraction, self.split_seed)
        return read_case_folder(Path(self.folder), self.val_fraction, self.split_seed)  # type: ignore[arg-type]

    def input_record(self) -> dict[str, str | None]:
        """How inputs were read, for the checkpoint (a rule, no per-file value): ``predict-seg`` applies it."""
        return {"nifti_modality": self.modality}

    def setup(self, stage: str | None = None) -> None:
        if self.preprocessing is not None:
            return
        self.preprocessing = resolve_preprocessing(parse_init(self.init, self.card))
        self.dims = dims_for(self.preprocessing)
        if self.augment.active and self.dims.spatial_dims == 3:
            raise ValueError(
                "data.augment is 2D only (rotation, zoom, shading of planes): leave it off for a 3D encoder, "
                "whose patches take data.crop_scale and data.hflip_prob"
            )
        train, val = split_cases(self.cases(), str(self.csv or self.folder), self.max_train_cases)
        self.train_cases = [self._prepare(c) for c in train]
        self.val_cases = [self._prepare(c) for c in val]
        logger.info("segmentation data: %d training and %d validation volumes", len(train), len(val))

    def _prepare(self, case: Case) -> PreparedCase | PreparedVolume:
        assert self.dims is not None and self.preprocessing is not None
        try:
            return self.dims.prepare_case(case, self.preprocessing, self.num_classes, self.modality, self.cache_dir)
        except VolumeError as e:
            source = self.csv if self.csv is not None else self.folder
            raise VolumeError(f"{source}: {case.where}: {e}") from None

    def train_dataloader(self) -> DataLoader:
        """Planes (2D) or ``samples_per_epoch`` distinct random patches (3D), by the card's dimensionality."""
        assert self.dims is not None, "setup() first"
        return self.dims.train_loader(self)

    def val_dataloader(self) -> DataLoader | list:
        if not self.val_cases:
            return []
        return DataLoader(VolumeDataset(self.val_cases), batch_size=1, collate_fn=_single)
