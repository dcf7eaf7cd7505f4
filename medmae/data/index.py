"""Which series and slices the dataset draws from, and how often.

Two steps, both pure functions of the manifest rows (no array is read here):

1. :func:`select_series` keeps the rows of one split that pass the filters (modality, minimum plane
   size, minimum slice count, plane anisotropy, slice spacing for millimetre 2.5D neighbours) and
   counts why the others were dropped.
2. :class:`SliceIndex` lays the kept series' slices along one axis end to end, so a flat *position*
   ``0 <= p < len(index)`` names one (series, slice) pair, and holds the sampling weights.

Sampling policy: series ``i`` with ``n_i`` slices gets probability ``n_i**alpha / sum_j n_j**alpha`` and
its slices share it equally (each slice ``n_i**(alpha - 1)``, normalised). ``alpha = 1`` is uniform over
slices (a 600-slice CT counts 600 times a chest X-ray); ``alpha = 0`` is uniform over series (every
X-ray counts as much as a whole CT); the default ``alpha = 0.5`` sits between (the CT counts
``sqrt(600) ~ 24.5`` X-rays).

Planes along each axis, with the cache's canonical (Z, Y, X) = (inferior->superior, anterior->posterior,
right->left) arrays:

==========  ==============  ===============================  ============================
axis        slices along    plane rows (top -> bottom)       plane columns (left -> right)
==========  ==============  ===============================  ============================
axial       Z (inf -> sup)  Y: anterior -> posterior         X: patient right -> left
coronal     Y (ant -> post) Z reversed: superior -> inferior X: patient right -> left
sagittal    X (right->left) Z reversed: superior -> inferior Y: anterior -> posterior
==========  ==============  ===============================  ============================

Series of kind ``image`` (one 2D picture, Z == 1) are always used as their single (Y, X) plane,
whatever the axis.

:class:`SliceIndex` keeps no manifest row: it turns them into a columnar
:class:`~medmae.data.series_table.SeriesTable` (numpy arrays) when it is built, so DataLoader
workers forked from the main process read per-series data without touching a Python object per
series and their memory stays flat in the number of series (issue 20). ``rows`` rebuilds the
records from the columns for callers in the main process.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from medmae.data.cache import ManifestRow
from medmae.data.neighbours import fits_slice_spacing
from medmae.data.series_table import SeriesRows, SeriesTable

#: Slicing axes and the array axis (of the canonical (Z, Y, X) array) that each one steps along.
AXES: dict[str, int] = {"axial": 0, "coronal": 1, "sagittal": 2}


def plane_geometry(row: ManifestRow, axis: str) -> tuple[int, int, int]:
    """``(n_slices, height, width)`` of the 2D planes of ``row`` when slicing along ``axis``."""
    z, y, x = row.shape
    if row.kind == "image" or axis == "axial":
        return z, y, x
    if axis == "coronal":
        return y, z, x
    return x, z, y


def axis_spacing(row: ManifestRow, axis: str) -> float | None:
    """Millimetres between the planes of ``row`` along ``axis``; ``None`` for a single 2D image
    (kind ``image``: its Z spacing is a placeholder, it has no through-plane geometry)."""
    if row.kind == "image":
        return None
    return float(row.spacing[AXES[axis]])


def plane_anisotropy(row: ManifestRow, axis: str) -> float:
    """Ratio of the larger to the smaller pixel spacing of the planes along ``axis`` (1.0 = square)."""
    sz, sy, sx = row.spacing
    if row.kind == "image" or axis == "axial":
        a, b = sy, sx
    elif axis == "coronal":
        a, b = sz, sx
    else:
        a, b = sz, sy
    return max(a, b) / min(a, b)


@dataclass(frozen=True)
class Selection:
    """The rows kept by :func:`select_series` and, per reason, how many rows of the split were dropped."""

    rows: tuple[ManifestRow, ...]
    dropped: Counter[str]


def select_series(
    rows: Iterable[ManifestRow],
    *,
    split: str,
    axis: str = "axial",
    modalities: Sequence[str] | None = None,
    min_size: int = 1,
    min_slices: int = 1,
    include_images: bool = True,
    max_anisotropy: float = 1.5,
    slice_spacing_mm: float | None = None,
) -> Selection:
    """Keep the rows of ``split`` that the dataset can use.

    Args:
        rows: manifest rows (any order; the result keeps it).
        split: ``"train"`` or ``"val"``; rows of other splits are ignored (not counted as dropped).
        axis: slicing axis, one of :data:`AXES`.
        modalities: modality codes to keep (case-insensitive), or ``None`` for all.
        min_size: smallest allowed plane height and width, in pixels (reason ``min_size``).
        min_slices: smallest allowed number of slices of a ``volume`` along ``axis`` (reason
            ``min_slices``); ``image`` series are exempt.
        include_images: keep series of kind ``image`` (X-rays etc.; reason ``image``).
        max_anisotropy: for volumes, the largest allowed ratio of the plane's two pixel spacings
            (reason ``anisotropy``): a 5 mm-slice CT cut sagittally would give pixels 5x taller than
            wide, and so do the axial planes of a sagittally acquired MR stack (the cache stores
            every series in the same anatomical orientation). Images are not checked.
        slice_spacing_mm: with 2.5D channels placed in millimetres (``medmae.data.neighbours``), the
            series whose spacing along ``axis`` is coarser than this (beyond a 1 % tolerance), and
            every single image (no through-plane neighbours), are dropped (reason
            ``slice_spacing``): their neighbours would be invented, not seen. ``None``: no check.

    Returns:
        The kept rows and a ``Counter`` of drop reasons.
    """
    if axis not in AXES:
        raise ValueError(f"axis must be one of {tuple(AXES)}, got {axis!r}")
    wanted = None if modalities is None else {m.upper() for m in modalities}
    kept: list[ManifestRow] = []
    dropped: Counter[str] = Counter()
    for row in rows:
        if row.split != split:
            continue
        n, h, w = plane_geometry(row, axis)
        if wanted is not None and row.modality.upper() not in wanted:
            dropped["modality"] += 1
        elif row.kind == "image" and not include_images:
            dropped["image"] += 1
        elif min(h, w) < min_size:
            dropped["min_size"] += 1
        elif row.kind == "volume" and n < min_slices:
            dropped["min_slices"] += 1
        elif row.kind == "volume" and plane_anisotropy(row, axis) > max_anisotropy:
            dropped["anisotropy"] += 1
        elif not fits_slice_spacing(axis_spacing(row, axis), slice_spacing_mm):
            dropped["slice_spacing"] += 1
        else:
            kept.append(row)
    return Selection(rows=tuple(kept), dropped=dropped)


def series_weights(n_slices: np.ndarray, alpha: float) -> np.ndarray:
    """Probability of each series under the ``n_slices ** alpha`` policy (sums to 1).

    Examples::

        >>> series_weights(np.array([1, 4]), 0.5).round(3).tolist()
        [0.333, 0.667]
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"sampling_alpha must be in [0, 1], got {alpha!r}")
    n = np.asarray(n_slices, dtype=np.float64)
    if n.size == 0 or (n <= 0).any():
        raise ValueError("series_weights needs at least one series, each with at least one slice")
    w = n**alpha
    return w / w.sum()


class SliceIndex:
    """Flat index of the (series, slice) pairs of some series along one axis, with sampling weights.

    Position ``p`` belongs to series ``i`` when ``offsets[i] <= p < offsets[i + 1]``; its slice number is
    ``p - offsets[i]``. Memory is O(number of series), whatever the number of slices, and all of it is
    numpy arrays (:attr:`table` and the per-series columns below): no Python object per series.

    Args:
        rows: the series, in order (usually :attr:`Selection.rows`), or their :class:`SeriesTable`;
            may be empty.
        axis: slicing axis, one of :data:`AXES`.
        alpha: sampling exponent in [0, 1] (see the module docstring).

    Examples::

        index = SliceIndex(rows, "axial", alpha=0.5)
        series, slice_ = index.locate(17)
        positions = index.draw(np.random.default_rng(0), 1000)
    """

    def __init__(self, rows: Sequence[ManifestRow] | SeriesTable, axis: str = "axial", alpha: float = 0.5) -> None:
        if axis not in AXES:
            raise ValueError(f"axis must be one of {tuple(AXES)}, got {axis!r}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"sampling_alpha must be in [0, 1], got {alpha!r}")
        #: every field of the series, as numpy columns (what the datasets read per sample)
        self.table: SeriesTable = rows if isinstance(rows, SeriesTable) else SeriesTable.from_rows(rows)
        self.axis = axis
        self.alpha = float(alpha)
        geometry, spacings = plane_columns(self.table, axis)
        self.n_slices: np.ndarray = geometry[:, 0].copy()
        self.plane_shapes: np.ndarray = geometry[:, 1:].copy()
        #: mm between planes along the axis per series (NaN for single images)
        self.axis_spacings: np.ndarray = spacings
        self.offsets: np.ndarray = np.concatenate([[0], np.cumsum(self.n_slices)]).astype(np.int64)
        if len(self.table):
            self.series_probs: np.ndarray = series_weights(self.n_slices, self.alpha)
            self._cum = np.cumsum(self.series_probs)
        else:
            self.series_probs = np.zeros(0)
            self._cum = np.zeros(0)

    @property
    def rows(self) -> SeriesRows:
        """The series' records, rebuilt from :attr:`table` on each access (main process only: a
        worker that reads them makes its own copy of what it reads)."""
        return SeriesRows(self.table)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def num_series(self) -> int:
        return len(self.table)

    def locate(self, position: int) -> tuple[int, int]:
        """``(series, slice)`` of a flat position."""
        if not 0 <= position < len(self):
            raise IndexError(f"position {position} out of range for an index of {len(self)} slices")
        series = int(np.searchsorted(self.offsets, position, side="right")) - 1
        return series, int(position - self.offsets[series])

    def plane_shape(self, series: int) -> tuple[int, int]:
        """``(height, width)`` of the planes of one series."""
        h, w = self.plane_shapes[series]
        return int(h), int(w)

    def axis_spacing(self, series: int) -> float | None:
        """Millimetres between the planes of one series along the axis (``None`` for a single image)."""
        d = float(self.axis_spacings[series])
        return None if math.isnan(d) else d

    def slice_probabilities(self) -> np.ndarray:
        """Probability of every position under the policy (length ``len(self)``, sums to 1)."""
        return np.repeat(self.series_probs / self.n_slices, self.n_slices)

    def draw(self, rng: np.random.Generator, size: int | None = None) -> np.ndarray | int:
        """Draw positions with replacement under the policy: a series by weight, then a slice uniformly.

        Args:
            rng: the generator to consume (exactly two uniform draws per position).
            size: number of positions, or ``None`` for a single ``int``.
        """
        if not len(self.table):
            raise ValueError("cannot draw from an empty slice index")
        n = 1 if size is None else int(size)
        u_series = rng.random(n)
        u_slice = rng.random(n)
        series = np.minimum(np.searchsorted(self._cum, u_series * self._cum[-1], side="right"), len(self.table) - 1)
        counts = self.n_slices[series]
        slices = np.minimum((u_slice * counts).astype(np.int64), counts - 1)
        positions = self.offsets[series] + slices
        return int(positions[0]) if size is None else positions

    def composition(self) -> dict[str, object]:
        """What the index is made of, as counts only (never an id): for the export card's provenance.

        Totals and breakdowns by ``modality``, ``source`` (dicom / nifti) and ``kind`` (volume /
        image), each with ``series``, ``slices`` (planes along the axis, i.e. what sampling draws
        from) and ``patients`` (distinct pseudonymous patients; a patient with a CT and an MR counts
        once in each modality and once in the total).
        """

        def counts(members: np.ndarray) -> dict[str, int]:
            return {
                "series": len(members),
                "slices": int(self.n_slices[members].sum()),
                "patients": len(np.unique(self.table.patients[members])),
            }

        def by(field: str) -> dict[str, dict[str, int]]:
            return {key: counts(members) for key, members in self.table.groups(field).items()}

        return {
            **counts(np.arange(self.num_series)),
            "by_modality": by("modality"),
            "by_source": by("source"),
            "by_kind": by("kind"),
        }

    def describe(self) -> dict[str, object]:
        """Counts for logs and reports (no ids)."""
        return {
            "series": self.num_series,
            "slices": len(self),
            "kinds": {k: len(m) for k, m in self.table.groups("kind").items()},
            "modalities": {k: len(m) for k, m in self.table.groups("modality").items()},
        }


def plane_columns(table: SeriesTable, axis: str) -> tuple[np.ndarray, np.ndarray]:
    """:func:`plane_geometry` and :func:`axis_spacing` of every series of ``table`` at once:
    ``(n_slices, height, width)`` int64 ``(n, 3)`` and the spacing along ``axis`` float64 ``(n,)``
    (NaN for single images)."""
    if axis not in AXES:
        raise ValueError(f"axis must be one of {tuple(AXES)}, got {axis!r}")
    z, y, x = table.shapes.T
    image = table.is_value("kind", "image")
    if axis == "axial":
        geometry = np.stack([z, y, x], axis=1)
    elif axis == "coronal":
        geometry = np.where(image[:, None], np.stack([z, y, x], axis=1), np.stack([y, z, x], axis=1))
    else:
        geometry = np.where(image[:, None], np.stack([z, y, x], axis=1), np.stack([x, z, y], axis=1))
    spacings = np.where(image, np.nan, table.spacings[:, AXES[axis]]).astype(np.float64)
    return geometry.astype(np.int64).reshape(-1, 3), spacings
