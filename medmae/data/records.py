"""The preprocessing record of a :class:`~medmae.data.CacheDataModule`: what the checkpoint and the export card carry.

Every data choice is written down (no path, no id) so fine-tuning and inference can rebuild the
encoder's input from the card alone (``medmae.export.preprocessing_from_card``). Slices and volumes
share the provenance fields (versions, selection, sampling, ``training_data``, seed, RNG rule) and
differ in the geometry their transform describes. The record's layout is the card's and does not follow
the config's sections (``data.sampling``, ``data.selection``...; issue 19): it stays byte-identical.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from medmae import __version__
from medmae.data.neighbours import SLICE_SPACING_RTOL

PREPROCESSING_VERSION = 1

SOURCE = "medmae cache (canonical LPS (Z, Y, X) arrays; HU for CT)"
RNG_RULE = "numpy default_rng([seed, 0, epoch, draw]) per training sample; [seed, 1, i] validation"
SLICE_ORDER = {"axial": "inferior -> superior", "coronal": "anterior -> posterior", "sagittal": "patient right -> left"}
PLANE_ORIENTATION = {
    "axial": "rows anterior -> posterior, columns patient right -> left",
    "coronal": "rows superior -> inferior, columns patient right -> left",
    "sagittal": "rows superior -> inferior, columns anterior -> posterior",
}


def _versions() -> dict[str, str]:
    return {"medmae": __version__, "numpy": np.__version__, "torch": torch.__version__.split("+")[0]}


def _sampling(dm: Any, policy: str) -> dict[str, Any]:
    return {
        "policy": policy,
        "alpha": dm.sampling.sampling_alpha,
        "samples_per_epoch": dm.sampling.samples_per_epoch,
        "val_samples": dm.sampling.val_samples,
        "foreground_tries": dm.foreground.foreground_tries,
    }


def _modalities(dm: Any) -> list[str] | None:
    modalities = dm.selection.modalities
    return None if modalities is None else list(modalities)


def slice_record(dm: Any) -> dict[str, Any]:
    """The record of a 2D / 2.5D datamodule (axis, planes, channels, crop, intensity, selection)."""
    spacing = dm._spacing_filter()
    record: dict[str, Any] = {
        "version": PREPROCESSING_VERSION,
        "source": SOURCE,
        "axis": dm.axis,
        "slice_order": SLICE_ORDER[dm.axis],
        "plane_orientation": PLANE_ORIENTATION[dm.axis],
        "images": (
            "single 2D images are not used (no through-plane neighbours in millimetres)"
            if spacing is not None
            else "single 2D images use their one plane, repeated to every slice channel"
        ),
        "versions": _versions(),
    }
    record.update(dm.transform.describe())
    if dm.augmenter.active:  # absent when off, so records of runs without it are unchanged
        record["augment"] = dm.augmenter.describe()
    record["selection"] = {
        "modalities": _modalities(dm),
        "min_size": dm.selection.min_size,
        "min_slices": dm.selection.min_slices,
        "include_images": dm.selection.include_images,
        "max_anisotropy": dm.selection.max_anisotropy,
        "slice_spacing_mm": spacing,
        "slice_spacing_rule": (
            f"volumes with spacing along the axis > slice_spacing_mm x {1 + SLICE_SPACING_RTOL:g}, and single "
            "images, dropped"
            if spacing is not None
            else "none"
        ),
        "splits": {"train": "train", "val": "val"},
    }
    policy = "series weight n_slices**alpha, slices uniform within a series, with replacement"
    record["sampling"] = _sampling(dm, policy)
    record["training_data"] = dm.training_data
    record["seed"] = dm.seed
    record["rng"] = RNG_RULE
    return record


def volume_record(dm: Any) -> dict[str, Any]:
    """The record of a 3D datamodule (``data.volume``): ``spatial_dims: 3`` and the volume geometry."""
    return {
        "version": PREPROCESSING_VERSION,
        "source": SOURCE,
        "versions": _versions(),
        **dm.volume_transform.describe(),
        "selection": {
            "modalities": _modalities(dm),
            "images": "single 2D images are not used",
            "rules": "volume_anisotropy: max/min voxel spacing > max_anisotropy; volume_coverage: extent < "
            "min_coverage x field of view along an axis",
            "splits": {"train": "train", "val": "val"},
        },
        "sampling": _sampling(
            dm,
            "series weight (physical volume / field of view)**alpha, with replacement; a new crop of the same "
            "series replaces a background crop",
        ),
        "training_data": dm.training_data,
        "seed": dm.seed,
        "rng": RNG_RULE,
    }
