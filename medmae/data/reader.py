"""Reading crops of cached series: lazily opened memory maps, a truncation guard, one copy per read.

Each process (main or DataLoader worker) opens the arrays it needs on first use with
``cache.open_series_array`` (memory-mapped, checked against the record) and keeps at most
``max_open`` of them open (least recently used closed first; each open map holds a file descriptor).
Open maps are never pickled: a worker started with ``spawn``/``forkserver`` reopens what it needs.

A read copies only the requested box of the requested slices, in the storage dtype. Every read first
``stat``s the file (about 2 µs): a file that disappeared raises ``CacheEntryError('missing_array')``
and one shorter than its map raises ``CacheEntryError('truncated_array')`` *before* the map is
touched, because touching a mapped page past the end of a truncated file kills the process with
SIGBUS rather than raising. (Caches are written atomically, so this only happens when something else
edits the cache during training.) Any other ``OSError``/``ValueError`` while slicing becomes
``CacheEntryError('read_error')``.

Per-series data comes from a columnar :class:`~medmae.data.series_table.SeriesTable` (numpy arrays),
so a read touches no Python object per series (see ``series_table.py`` for why that keeps forked
workers' memory flat); the record of a series is rebuilt only to open its map, the map's entry then
keeps the path and id it needs.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medmae.data.cache import CacheEntryError, SeriesRecord, open_series_array
from medmae.data.index import AXES
from medmae.data.series_table import SeriesTable
from medmae.data.transforms import CropBox


def plane_view(array: np.ndarray, kind: str, axis: str) -> np.ndarray:
    """View a canonical (Z, Y, X) array as a stack of planes ``(n_slices, height, width)`` along ``axis``.

    No data is read. Rows of coronal and sagittal planes run superior -> inferior (Z reversed), so
    every plane shows the head up; see ``index.py`` for the full orientation table.
    """
    if kind == "image" or axis == "axial":
        return array
    if axis == "coronal":
        return array.transpose(1, 0, 2)[:, ::-1, :]
    if axis == "sagittal":
        return array.transpose(2, 0, 1)[:, ::-1, :]
    raise ValueError(f"axis must be one of {tuple(AXES)}, got {axis!r}")


class SeriesReader:
    """Reads crops of the series in ``records`` (addressed by their position in that sequence).

    Args:
        cache_dir: the cache directory.
        records: the series (usually an index's ``table``), as a :class:`SeriesTable` or a sequence
            of records (turned into one).
        axis: slicing axis, one of ``index.AXES``.
        max_open: most memory maps kept open per process.
    """

    def __init__(
        self, cache_dir: str | Path, records: SeriesTable | Sequence[SeriesRecord], axis: str, max_open: int = 64
    ) -> None:
        if axis not in AXES:
            raise ValueError(f"axis must be one of {tuple(AXES)}, got {axis!r}")
        if max_open < 1:
            raise ValueError(f"max_open_files must be >= 1, got {max_open!r}")
        self.cache_dir = Path(cache_dir)
        self.table = records if isinstance(records, SeriesTable) else SeriesTable.from_rows(records)
        self.axis = axis
        self.max_open = int(max_open)
        # series -> (array view, expected file size, path, series id, kind); at most max_open entries
        self._open: OrderedDict[int, tuple[np.ndarray, int, Path, str, str]] = OrderedDict()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_open"] = OrderedDict()  # memory maps stay in the process that opened them
        return state

    def close(self) -> None:
        """Drop every open map (they close when garbage collected)."""
        self._open.clear()

    def _entry(self, series: int) -> tuple[np.ndarray, int, Path, str, str]:
        entry = self._open.get(series)
        if entry is None:
            record = self.table.row(series)
            mapped = open_series_array(self.cache_dir, record, mmap=True)
            expected = int(getattr(mapped, "offset", 0)) + mapped.nbytes
            # a plain ndarray view of the map: same pages, without np.memmap's per-slice Python overhead
            entry = (mapped.view(np.ndarray), expected, self.cache_dir / record.array, record.series_id, record.kind)
            self._open[series] = entry
            while len(self._open) > self.max_open:
                self._open.popitem(last=False)
        else:
            self._open.move_to_end(series)
        _, expected, path, series_id, _ = entry
        try:
            size = os.stat(path).st_size
        except FileNotFoundError:
            self._open.pop(series, None)
            raise CacheEntryError(series_id, "missing_array") from None
        except OSError as e:
            self._open.pop(series, None)
            raise CacheEntryError(self.table.series_ids[series], "read_error", e.__class__.__name__) from e
        if size < expected:
            self._open.pop(series, None)
            raise CacheEntryError(series_id, "truncated_array", f"{size} < {expected} bytes")
        return entry

    def _array(self, series: int) -> np.ndarray:
        return self._entry(series)[0]

    def read(self, series: int, slices: np.ndarray, box: CropBox, flip: bool = False) -> np.ndarray:
        """Copy ``box`` of the given slices (plane indices along the axis) into a new ``(k, h, w)`` array.

        Args:
            series: position of the series in ``records``.
            slices: plane indices (any order, repeats allowed), each in ``[0, n_slices)``.
            box: the crop box in plane coordinates.
            flip: mirror the columns (left-right flip) while copying.

        Raises:
            CacheEntryError: the array is missing, truncated, mismatched or unreadable.
        """
        try:
            array, _, _, series_id, kind = self._entry(series)
            view = plane_view(array, kind, self.axis)
            lo, hi = int(slices.min()), int(slices.max())
            if flip:
                stop = box.left - 1 if box.left > 0 else None
                cols = slice(box.left + box.width - 1, stop, -1)
            else:
                cols = slice(box.left, box.left + box.width)
            block = view[lo : hi + 1, box.top : box.top + box.height, cols]
            out = np.asarray(block[slices - lo])
        except CacheEntryError:
            raise
        except (OSError, ValueError, IndexError) as e:
            self._open.pop(series, None)
            raise CacheEntryError(self.table.series_ids[series], "read_error", e.__class__.__name__) from e
        if out.shape != (len(slices), box.height, box.width):
            raise CacheEntryError(series_id, "read_error", f"box {box} outside plane {view.shape}")
        return out

    def read_box(self, series: int, box: Sequence[tuple[int, int]]) -> np.ndarray:
        """Copy the ``[lo, hi)`` ranges along (Z, Y, X) of a series' canonical array (a 3D crop's box).

        Only those voxels are read from the memory map (the volume is never loaded whole).

        Raises:
            CacheEntryError: the array is missing, truncated, mismatched or unreadable, or the box
                does not lie inside it.
        """
        try:
            array, _, _, series_id, _ = self._entry(series)
            (z0, z1), (y0, y1), (x0, x1) = box
            out = np.array(array[z0:z1, y0:y1, x0:x1])
        except CacheEntryError:
            raise
        except (OSError, ValueError, IndexError) as e:
            self._open.pop(series, None)
            raise CacheEntryError(self.table.series_ids[series], "read_error", e.__class__.__name__) from e
        expected = tuple(hi - lo for lo, hi in box)
        if out.shape != expected:
            raise CacheEntryError(series_id, "read_error", f"box {list(box)} outside array {array.shape}")
        return out
