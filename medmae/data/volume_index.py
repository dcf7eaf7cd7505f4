"""Which series a 3D dataset draws from, and how often: :func:`select_volumes` and :class:`VolumeIndex`.

Split out of ``medmae.data.volume`` (issue 19): selection and sampling weights are the 3D
counterpart of ``medmae.data.index`` and need no torch; the crop geometry and resampling stay in
``volume.py``, which re-exports these names.

Like :class:`~medmae.data.index.SliceIndex`, :class:`VolumeIndex` keeps no manifest row: its series
are a columnar :class:`~medmae.data.series_table.SeriesTable` (numpy arrays), so forked DataLoader
workers never touch a Python object per series and their memory stays flat in the number of series
(issue 20).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

import numpy as np

from medmae.data.cache import ManifestRow, SeriesRecord
from medmae.data.index import Selection, SliceIndex, select_series, series_weights
from medmae.data.series_table import SeriesRows, SeriesTable
from medmae.data.volume_options import Triple, VolumeOptions


def series_extent_mm(row: SeriesRecord) -> Triple:
    """Physical extent of a series along (Z, Y, X): voxels times spacing."""
    return tuple(float(n) * float(s) for n, s in zip(row.shape, row.spacing, strict=True))  # type: ignore[return-value]


def select_volumes(
    rows: Sequence[ManifestRow], *, split: str, options: VolumeOptions, modalities: Sequence[str] | None = None
) -> Selection:
    """The rows of ``split`` the 3D model can use, and per reason how many were dropped.

    Modality and kind checks are :func:`~medmae.data.index.select_series`'s (reasons ``modality``,
    ``image``); then ``volume_anisotropy`` and ``volume_coverage`` (see ``medmae.data.volume``).
    """
    base = select_series(
        rows, split=split, modalities=modalities, include_images=False, max_anisotropy=math.inf, min_size=1
    )
    kept: list[ManifestRow] = []
    dropped: Counter[str] = Counter(base.dropped)
    fov = options.fov_mm
    for row in base.rows:
        spacing = [float(s) for s in row.spacing]
        extent = series_extent_mm(row)
        if max(spacing) / min(spacing) > options.max_anisotropy:
            dropped["volume_anisotropy"] += 1
        elif any(e < options.min_coverage * f for e, f in zip(extent, fov, strict=True)):
            dropped["volume_coverage"] += 1
        else:
            kept.append(row)
    return Selection(rows=tuple(kept), dropped=dropped)


class VolumeIndex:
    """The series a 3D dataset draws from, one position per series, with sampling weights.

    Series ``i`` is drawn with probability proportional to ``v_i ** alpha``, ``v_i`` its physical
    volume in units of the output field of view (how many distinct crops it holds): ``alpha = 0``
    every series equally, ``1`` proportional to its size. Exposes what the sampler and the datamodule
    need from an index (``len``, ``draw``, ``rows``, ``composition``, ``describe``); the series
    themselves are :attr:`table` (numpy columns).

    Args:
        rows: the series, in order (usually :attr:`Selection.rows`), or their :class:`SeriesTable`.
        options: the sample geometry (its field of view scales the sizes).
        alpha: sampling exponent in [0, 1].
    """

    def __init__(self, rows: Sequence[ManifestRow] | SeriesTable, options: VolumeOptions, alpha: float = 0.5) -> None:
        #: every field of the series, as numpy columns (what the dataset reads per sample)
        self.table: SeriesTable = rows if isinstance(rows, SeriesTable) else SeriesTable.from_rows(rows)
        self.options = options
        self.alpha = float(alpha)
        fov = math.prod(options.fov_mm)
        self.sizes = np.maximum(series_volumes_mm3(self.table) / fov, 1e-6)
        self.series_probs = series_weights(self.sizes, self.alpha) if len(self.table) else np.zeros(0)
        self._cum = np.cumsum(self.series_probs)

    @property
    def rows(self) -> SeriesRows:
        """The series' records, rebuilt from :attr:`table` on each access (main process only)."""
        return SeriesRows(self.table)

    def __len__(self) -> int:
        return len(self.table)

    @property
    def num_series(self) -> int:
        return len(self.table)

    def draw(self, rng: np.random.Generator, size: int | None = None) -> np.ndarray | int:
        """Draw series positions with replacement by weight (one uniform draw per position)."""
        if not len(self.table):
            raise ValueError("cannot draw from an empty volume index")
        n = 1 if size is None else int(size)
        u = rng.random(n)
        series = np.minimum(np.searchsorted(self._cum, u * self._cum[-1], side="right"), len(self.table) - 1)
        return int(series[0]) if size is None else series.astype(np.int64)

    def composition(self) -> dict[str, object]:
        """Counts of series, axial slices and patients by modality, source and kind (no ids)."""
        return SliceIndex(self.table, "axial", self.alpha).composition()

    def describe(self) -> dict[str, object]:
        """Counts for logs and reports (no ids)."""
        return {
            "series": self.num_series,
            "modalities": {k: len(m) for k, m in self.table.groups("modality").items()},
        }


def series_volumes_mm3(table: SeriesTable) -> np.ndarray:
    """The product of :func:`series_extent_mm` for every series of ``table`` (float64, same rounding)."""
    extent = table.shapes.astype(np.float64) * table.spacings
    return extent[:, 0] * extent[:, 1] * extent[:, 2]
