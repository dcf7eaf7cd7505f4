"""Map-style dataset of 2D / 2.5D samples from the cache.

A key is either a :class:`~medmae.data.sampler.SampleKey` ``(epoch, draw, position)`` from
:class:`~medmae.data.sampler.EpochWeightedSampler` (training: RNG
``default_rng([seed, 0, epoch, draw])``) or a plain ``int`` ``i`` (a fixed sample: RNG
``default_rng([seed, 1, i])``, position ``positions[i]`` or ``i``). Crop, flip, CT window and any
replacement draw come from that RNG only, so a sample is a pure function of its key and the cache.

Failures never stop the run:

* a cache entry that cannot be read (``CacheEntryError``: missing, truncated, mismatched, read error)
  is counted under its reason in :attr:`CacheSliceDataset.skip_counts`, logged once per series and
  process (pseudonymous series id only), remembered as bad in this process, and the sample is
  replaced by a new draw from the same RNG (so the replacement is the same in every worker);
  after ``max_read_failures`` failures in a row for one sample, ``RuntimeError`` (the cache is gone);
* with the foreground filter on, a crop whose centre slice is almost all background is replaced the
  same way, up to ``foreground_tries`` times; the last candidate is then kept.

Each sample reports how often it was replaced (``"skipped"``, ``"rejected"``), so the training loop can
sum them over all workers.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from medmae.data.cache import CacheEntryError
from medmae.data.device_path import raw_sample
from medmae.data.index import SliceIndex
from medmae.data.neighbours import fits_slice_spacing
from medmae.data.reader import SeriesReader
from medmae.data.sampler import STREAM_FIXED_SAMPLE, STREAM_TRAIN_SAMPLE, SampleKey
from medmae.data.transforms import SliceTransform

logger = logging.getLogger(__name__)


class CacheSliceDataset(Dataset):
    """Samples of ``transform.slices`` planes (adjacent, or ``slice_spacing_mm`` apart) from the series of ``index``.

    Args:
        cache_dir: the cache directory.
        index: which (series, slice) positions exist and how to draw replacements.
        transform: crop plan, foreground test and pixel transform.
        seed: base seed (>= 0) of every sample's RNG.
        random_crop: random-resized crop + flip (training) or centre crop, no flip (validation).
        positions: for ``int`` keys, the positions they stand for (default: key ``i`` is position ``i``).
        foreground_tries: most background crops replaced per sample (when the filter is on).
        max_read_failures: unreadable entries tolerated in a row for one sample before giving up.
        max_open_files: memory maps kept open per process.

    Returns (per item) a dict: ``image`` float32 ``(C, H, W)`` in [0, 1]; ``index`` (the draw number,
    or the int key); ``epoch`` (the sampler's epoch of a training key, -1 for an int key); ``series``
    and ``slice`` (where the sample came from, by position in
    ``index.rows`` and plane number); ``skipped`` and ``rejected`` (replacements made). With
    :attr:`defer_pixels` set (the GPU data path, ``medmae.data.device_path``) ``image`` is replaced by
    the unflipped stored-value crop and what the device needs to finish it.
    """

    def __init__(
        self,
        cache_dir: str | Path,
        index: SliceIndex,
        transform: SliceTransform,
        *,
        seed: int = 0,
        random_crop: bool = True,
        positions: np.ndarray | None = None,
        foreground_tries: int = 10,
        max_read_failures: int = 16,
        max_open_files: int = 64,
    ) -> None:
        if len(index) == 0:
            raise ValueError("the slice index is empty: no usable series")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed!r}")
        if foreground_tries < 0:
            raise ValueError(f"foreground_tries must be >= 0, got {foreground_tries!r}")
        if max_read_failures < 1:
            raise ValueError(f"max_read_failures must be >= 1, got {max_read_failures!r}")
        self.index = index
        self.transform = transform
        self.seed = int(seed)
        self.random_crop = bool(random_crop)
        self.positions = None if positions is None else np.asarray(positions, dtype=np.int64)
        if (
            self.positions is not None
            and len(self.positions)
            and not (0 <= self.positions.min() and self.positions.max() < len(index))
        ):
            raise ValueError("positions must lie in [0, len(index))")
        spacing_mm = transform.neighbours.spacing_mm if transform.neighbours.by_distance else None
        coarse = sum(not fits_slice_spacing(index.axis_spacing(i), spacing_mm) for i in range(index.num_series))
        if coarse:
            raise ValueError(
                f"{coarse} series of the index are coarser than slice_spacing_mm={spacing_mm} along the axis "
                "(or single images): select them out with select_series(..., slice_spacing_mm=...)"
            )
        self.foreground_tries = int(foreground_tries)
        self.max_read_failures = int(max_read_failures)
        self.reader = SeriesReader(cache_dir, index.rows, index.axis, max_open=max_open_files)
        #: per process: read failures by reason, and background crops replaced
        self.skip_counts: Counter[str] = Counter()
        self.rejected_count = 0
        self._bad: dict[int, str] = {}  # series position -> reason, in this process
        #: leave flip / resize / intensity to the device (set by CacheDataModule before its loaders start)
        self.defer_pixels = False

    def __len__(self) -> int:
        return len(self.index) if self.positions is None else len(self.positions)

    def _resolve(self, key: Any) -> tuple[np.random.Generator, int, int, int]:
        if isinstance(key, tuple):
            epoch, draw, position = (int(v) for v in SampleKey(*key))
            return np.random.default_rng([self.seed, STREAM_TRAIN_SAMPLE, epoch, draw]), position, draw, epoch
        i = int(key)
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for a dataset of {len(self)} samples")
        position = i if self.positions is None else int(self.positions[i])
        return np.random.default_rng([self.seed, STREAM_FIXED_SAMPLE, i]), position, i, -1

    def _record_skip(self, series: int, error: CacheEntryError) -> None:
        self.skip_counts[error.reason] += 1
        if series not in self._bad:
            self._bad[series] = error.reason
            logger.warning(
                "skipping cache entry %s: %s (%d unreadable entries, %d skipped reads in this process)",
                error.series_id,
                error.reason,
                len(self._bad),
                sum(self.skip_counts.values()),
            )

    def __getitem__(self, key: int | SampleKey) -> dict[str, Any]:
        rng, position, ident, epoch = self._resolve(key)
        skipped = rejected = 0
        while True:
            series, centre = self.index.locate(position)
            record = self.index.rows[series]
            box, flip = self.transform.plan(rng, self.index.plane_shape(series), self.random_crop)
            pick = self.transform.pick_planes(centre, int(self.index.n_slices[series]), self.index.axis_spacing(series))
            try:
                if series in self._bad:  # known bad here: fail fast, same RNG use as a real read
                    raise CacheEntryError(record.series_id, self._bad[series])
                # deferred: read unflipped, the device flips (the foreground test sees the flipped view)
                slab = pick.channels(self.reader.read(series, pick.indices, box, flip and not self.defer_pixels))
            except CacheEntryError as e:
                self._record_skip(series, e)
                skipped += 1
                if skipped >= self.max_read_failures:
                    raise RuntimeError(
                        f"{skipped} cache entries in a row could not be read for one sample (last: {e}); "
                        f"{len(self._bad)} unreadable entries so far: is the cache still there?"
                    ) from e
                position = self.index.draw(rng)
                continue
            seen = slab[..., ::-1] if flip and self.defer_pixels else slab
            if rejected < self.foreground_tries and not self.transform.is_foreground(seen, record):
                rejected += 1
                self.rejected_count += 1
                position = self.index.draw(rng)
                continue
            if self.defer_pixels:
                values, ranges = self.transform.prepare(slab, record, rng)
                pixels = raw_sample(values, ranges, flip)
            else:
                pixels = {"image": self.transform(slab, record, rng)}
            return {
                **pixels,
                "index": ident,
                "epoch": epoch,
                "series": series,
                "slice": centre,
                "skipped": skipped,
                "rejected": rejected,
            }
