"""Training data from the cache: slice index, sampling, transforms, dataset and LightningDataModule.

``medmae.data.cache`` is the on-disk contract with ``data_prep``; everything else here only reads it.
See docs/data.md for the options and policies. Where each concern lives:

* the cache contract: ``cache`` (re-exports ``cache_records``, ``cache_series``, ``cache_manifest``);
* options, one validated dataclass per concern: ``options`` (2D) and ``volume_options`` (3D);
* which series a run uses and their index: ``splits``, ``index`` (slices), ``volume_index`` (3D),
  ``series_table`` (the columns loader workers read), ``manifest_pin`` (the version a run trains on);
* pretraining samples: ``sampler``, ``stream``, ``dataset`` / ``volume_dataset``, ``reader``, and the
  random per-sample transforms ``transforms`` (2D crops) and ``volume`` (3D crops), with the shared
  ``intensity`` and ``neighbours`` rules and the GPU path ``device_path``;
* fine-tuning and inference input, rebuilt from the card or the datamodule record by one function
  (``transform_record.build_transform``): the invertible ``plane_transform`` (2D / 2.5D) and
  ``volume_transform`` (3D), each with ``forward`` / ``labels`` / ``restore``;
* the LightningDataModule: ``datamodule``; the record it writes into checkpoints and cards: ``records``.

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
    "AugmentOptions": "medmae.data.options",
    "PlaneAugment": "medmae.data.augment",
    "NoUsableDataError": "medmae.data.splits",
    "PlanePreprocessor": "medmae.data.plane_transform",
    "SampleKey": "medmae.data.sampler",
    "SamplingOptions": "medmae.data.options",
    "SelectionOptions": "medmae.data.options",
    "SliceIndex": "medmae.data.index",
    "SliceTransform": "medmae.data.transforms",
    "VolumeOptions": "medmae.data.volume",
    "VolumePreprocessor": "medmae.data.volume_transform",
    "build_transform": "medmae.data.transform_record",
    "select_series": "medmae.data.index",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'medmae.data' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
