"""Map-style dataset of 3D crops from the cache (the 3D MAE's samples); see ``volume.py`` for the geometry.

Keys, RNG streams and the skip/replace loop are :class:`~medmae.data.dataset.CacheSampleDataset`'s,
so 3D training resumes exactly and survives unreadable entries like 2D. One difference: a crop that
fails the foreground test is replaced by a new crop *of the same series* (a CT always has a body
somewhere; a new series would bias sampling towards series with little air).

Like the 2D dataset, it reads per-series data from its index's numpy columns only (no record object
per series: flat worker memory in the number of series, issue 20); the record of the series a
sample lands on is rebuilt for that sample.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from medmae.data.cache import SeriesRecord
from medmae.data.dataset import CacheSampleDataset
from medmae.data.reader import SeriesReader
from medmae.data.volume import VolumeCrop, VolumeIndex, VolumeTransform


class CacheVolumeDataset(CacheSampleDataset):
    """3D samples ``(C, Z, Y, X)`` at ``options.spacing_mm`` from the series of a :class:`VolumeIndex`.

    Args:
        cache_dir: the cache directory.
        index: the series to draw from.
        transform: crop plan, foreground test and voxel transform.
        seed, random_crop, positions, foreground_tries, max_read_failures, max_open_files: as
            :class:`~medmae.data.dataset.CacheSliceDataset`.

    Returns (per item) a dict: ``image`` float32 ``(C, Z, Y, X)`` in [0, 1]; ``index``; ``epoch``;
    ``series`` (position in ``index.rows``); ``slice`` (-1: a volume has no single slice);
    ``skipped`` and ``rejected``.
    """

    def __init__(
        self,
        cache_dir: str | Path,
        index: VolumeIndex,
        transform: VolumeTransform,
        *,
        seed: int = 0,
        random_crop: bool = True,
        positions: np.ndarray | None = None,
        foreground_tries: int = 10,
        max_read_failures: int = 16,
        max_open_files: int = 64,
    ) -> None:
        super().__init__(
            cache_dir,
            index,
            seed=seed,
            random_crop=random_crop,
            positions=positions,
            foreground_tries=foreground_tries,
            max_read_failures=max_read_failures,
        )
        self.transform = transform
        self.reader = SeriesReader(cache_dir, index.table, "axial", max_open=max_open_files)
        #: the GPU data path is 2D only: 3D samples are always finished in the workers
        self.defer_pixels = False

    def _series_of(self, position: int) -> int:
        return position

    def _attempt(self, position: int, rng: np.random.Generator) -> tuple[VolumeCrop, Any, np.ndarray, SeriesRecord]:
        record = self.index.table.row(position)
        crop = self.transform.plan(rng, record, self.random_crop)
        box = crop.read_box(record.shape)
        self._check_known_bad(position)
        return crop, box, self.reader.read_box(position, box), record

    def _accept(self, position: int, candidate: tuple[VolumeCrop, Any, np.ndarray, SeriesRecord]) -> bool:
        return self.transform.is_foreground(candidate[2], candidate[3])

    def _replacement(self, position: int, rng: np.random.Generator) -> int:
        return position

    def _output(
        self, position: int, candidate: tuple[VolumeCrop, Any, np.ndarray, SeriesRecord], rng: np.random.Generator
    ) -> dict[str, Any]:
        crop, box, values, record = candidate
        image = self.transform(values, box, crop, record, rng)
        return {"image": image, "series": position, "slice": -1}
