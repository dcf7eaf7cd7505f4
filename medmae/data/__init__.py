"""Training data from the cache: slice index, sampling, transforms, dataset and LightningDataModule.

``medmae.data.cache`` is the on-disk contract with ``data_prep``; everything else here only reads it.
See docs/data.md for the options and policies.
"""

from medmae.data.datamodule import CacheDataModule, NoUsableDataError
from medmae.data.dataset import CacheSliceDataset
from medmae.data.index import AXES, SliceIndex, select_series
from medmae.data.sampler import EpochWeightedSampler, SampleKey
from medmae.data.transforms import DEFAULT_CT_WINDOWS, SliceTransform

__all__ = [
    "AXES",
    "DEFAULT_CT_WINDOWS",
    "CacheDataModule",
    "CacheSliceDataset",
    "EpochWeightedSampler",
    "NoUsableDataError",
    "SampleKey",
    "SliceIndex",
    "SliceTransform",
    "select_series",
]
