"""Map-style datasets of 2D / 2.5D samples (and, in ``volume_dataset.py``, 3D volumes) from the cache.

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

Memory: a dataset holds per-series data only as numpy arrays (its index's
:class:`~medmae.data.series_table.SeriesTable` and columns), never a record object per series, so
a forked DataLoader worker shares them with the main process for the whole run instead of copying
the pages of every series it samples (issue 20). The record a transform reads is rebuilt from the
columns for the one candidate being made, and dropped with it.
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


class CacheSampleDataset(Dataset):
    """What every cache dataset shares: keys -> sample RNG, the skip/replace loop, its counters.

    A subclass says how one attempt goes: :meth:`_attempt` plans (from the RNG) and reads a candidate
    (raising :class:`CacheEntryError`), :meth:`_accept` judges its foreground, :meth:`_output` turns
    it into the sample. An unreadable entry is replaced by a new draw from the index; a background
    candidate by :meth:`_replacement` (2D: a new draw; 3D: a new crop of the same series).
    """

    def __init__(
        self,
        cache_dir: str | Path,
        index: Any,
        *,
        seed: int = 0,
        random_crop: bool = True,
        positions: np.ndarray | None = None,
        foreground_tries: int = 10,
        max_read_failures: int = 16,
    ) -> None:
        if len(index) == 0:
            raise ValueError("the index is empty: no usable series")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed!r}")
        if foreground_tries < 0:
            raise ValueError(f"foreground_tries must be >= 0, got {foreground_tries!r}")
        if max_read_failures < 1:
            raise ValueError(f"max_read_failures must be >= 1, got {max_read_failures!r}")
        self.index = index
        self.seed = int(seed)
        self.random_crop = bool(random_crop)
        self.positions = None if positions is None else np.asarray(positions, dtype=np.int64)
        if (
            self.positions is not None
            and len(self.positions)
            and not (0 <= self.positions.min() and self.positions.max() < len(index))
        ):
            raise ValueError("positions must lie in [0, len(index))")
        self.foreground_tries = int(foreground_tries)
        self.max_read_failures = int(max_read_failures)
        #: per process: read failures by reason, and background crops replaced
        self.skip_counts: Counter[str] = Counter()
        self.rejected_count = 0
        self._bad: dict[int, str] = {}  # series position -> reason, in this process

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

    # ------------------------------------------------------------------ one attempt (subclasses)

    def _series_of(self, position: int) -> int:
        raise NotImplementedError

    def _attempt(self, position: int, rng: np.random.Generator) -> Any:
        raise NotImplementedError

    def _accept(self, position: int, candidate: Any) -> bool:
        raise NotImplementedError

    def _output(self, position: int, candidate: Any, rng: np.random.Generator) -> dict[str, Any]:
        raise NotImplementedError

    def _replacement(self, position: int, rng: np.random.Generator) -> int:
        return int(self.index.draw(rng))

    def __getitem__(self, key: int | SampleKey) -> dict[str, Any]:
        rng, position, ident, epoch = self._resolve(key)
        skipped = rejected = 0
        while True:
            series = self._series_of(position)
            try:
                candidate = self._attempt(position, rng)
            except CacheEntryError as e:
                self._record_skip(series, e)
                skipped += 1
                if skipped >= self.max_read_failures:
                    raise RuntimeError(
                        f"{skipped} cache entries in a row could not be read for one sample (last: {e}); "
                        f"{len(self._bad)} unreadable entries so far: is the cache still there?"
                    ) from e
                position = int(self.index.draw(rng))
                continue
            if rejected < self.foreground_tries and not self._accept(position, candidate):
                rejected += 1
                self.rejected_count += 1
                position = self._replacement(position, rng)
                continue
            return {
                **self._output(position, candidate, rng),
                "index": ident,
                "epoch": epoch,
                "skipped": skipped,
                "rejected": rejected,
            }

    def _check_known_bad(self, series: int) -> None:
        """Fail fast on a series already found unreadable in this process (same RNG use as a read)."""
        if series in self._bad:
            raise CacheEntryError(self.index.table.series_ids[series], self._bad[series])


class CacheSliceDataset(CacheSampleDataset):
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
        spacing_mm = transform.neighbours.spacing_mm if transform.neighbours.by_distance else None
        coarse = sum(not fits_slice_spacing(index.axis_spacing(i), spacing_mm) for i in range(index.num_series))
        if coarse:
            raise ValueError(
                f"{coarse} series of the index are coarser than slice_spacing_mm={spacing_mm} along the axis "
                "(or single images): select them out with select_series(..., slice_spacing_mm=...)"
            )
        self.reader = SeriesReader(cache_dir, index.table, index.axis, max_open=max_open_files)
        #: leave flip / resize / intensity to the device (set by CacheDataModule before its loaders start)
        self.defer_pixels = False

    def _series_of(self, position: int) -> int:
        return self.index.locate(position)[0]

    def _attempt(self, position: int, rng: np.random.Generator) -> tuple[Any, ...]:
        series, centre = self.index.locate(position)
        box, flip = self.transform.plan(rng, self.index.plane_shape(series), self.random_crop)
        pick = self.transform.pick_planes(centre, int(self.index.n_slices[series]), self.index.axis_spacing(series))
        self._check_known_bad(series)
        # deferred: read unflipped, the device flips (the foreground test sees the flipped view)
        slab = pick.channels(self.reader.read(series, pick.indices, box, flip and not self.defer_pixels))
        return series, centre, flip, slab, self.index.table.row(series)

    def _accept(self, position: int, candidate: tuple[Any, ...]) -> bool:
        _, _, flip, slab, record = candidate
        seen = slab[..., ::-1] if flip and self.defer_pixels else slab
        return self.transform.is_foreground(seen, record)

    def _output(self, position: int, candidate: tuple[Any, ...], rng: np.random.Generator) -> dict[str, Any]:
        series, centre, flip, slab, record = candidate
        if self.defer_pixels:
            values, ranges = self.transform.prepare(slab, record, rng)
            pixels = raw_sample(values, ranges, flip)
        else:
            pixels = {"image": self.transform(slab, record, rng)}
        return {**pixels, "series": series, "slice": centre}
