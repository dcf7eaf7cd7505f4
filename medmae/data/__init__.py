"""Training data from the cache: slice index, sampling, transforms, dataset and LightningDataModule.

``medmae.data.cache`` is the on-disk contract with ``data_prep``; everything else here only reads it.
See docs/data.md for the options and policies.

Names are imported lazily: ``data_prep`` imports ``medmae.data.cache`` and must not pay for torch
and Lightning at every ``medmae prep`` start.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "AXES": "medmae.data.index",
    "CacheChangedError": "medmae.data.manifest_pin",
    "DEFAULT_CT_WINDOWS": "medmae.data.transforms",
    "CacheDataModule": "medmae.data.datamodule",
    "CacheSliceDataset": "medmae.data.dataset",
    "CropOptions": "medmae.data.options",
    "EpochWeightedSampler": "medmae.data.sampler",
    "ForegroundOptions": "medmae.data.options",
    "IntensityOptions": "medmae.data.options",
    "LEGACY_KEYS": "medmae.data.options",
    "LoaderOptions": "medmae.data.options",
    "NoUsableDataError": "medmae.data.splits",
    "SampleKey": "medmae.data.sampler",
    "SamplingOptions": "medmae.data.options",
    "SelectionOptions": "medmae.data.options",
    "SliceIndex": "medmae.data.index",
    "SliceTransform": "medmae.data.transforms",
    "VolumeOptions": "medmae.data.volume",
    "select_series": "medmae.data.index",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'medmae.data' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
