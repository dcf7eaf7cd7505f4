"""One series in the cache: atomic writes, the array and its sidecar, checks of the array against its
record, and the intensity statistics a record stores.

Split out of ``medmae.data.cache`` (issue 19): writing and checking one series' files is a concern
of its own, next to the manifest (``cache_manifest``) and the record types (``cache_records``).
Import the names from ``medmae.data.cache``, the contract module; this module needs only numpy.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from medmae.data.cache_records import (
    PERCENTILES,
    SERIES_DIRNAME,
    CacheEntryError,
    CacheFormatError,
    SeriesRecord,
)

# ----------------------------------------------------------------------------- atomic writes


@contextmanager
def _atomic_file(path: Path, suffix: str) -> Iterator[BinaryIO]:
    """A temporary file beside ``path``, fsynced and renamed onto it when the block ends; removed when the
    block raises, so a crash leaves either the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash leaves either the old file or the whole new one."""
    with _atomic_file(path, ".tmp") as f:
        f.write(data)


def write_json_atomic(path: Path, obj: Any) -> None:
    """Atomically write ``obj`` as indented UTF-8 JSON (sorted keys, so reruns are byte-identical).

    Strict JSON: a NaN or +/-Inf anywhere raises ``ValueError`` before anything is written (Python's
    ``Infinity``/``NaN`` tokens are not JSON; other readers refuse them).
    """
    write_bytes_atomic(path, (json.dumps(obj, indent=1, sort_keys=True, allow_nan=False) + "\n").encode("utf-8"))


def write_array_atomic(path: Path, array: np.ndarray) -> None:
    """Atomically save ``array`` as an uncompressed ``.npy`` (memory-mappable by readers)."""
    with _atomic_file(path, ".npy.tmp") as f:
        np.save(f, np.ascontiguousarray(array), allow_pickle=False)


# ----------------------------------------------------------------------------- series entries


def series_array_path(series_id: str) -> str:
    """Relative path of a series' array inside the cache."""
    return f"{SERIES_DIRNAME}/{series_id}.npy"


def sidecar_path(cache_dir: Path, series_id: str) -> Path:
    return Path(cache_dir) / SERIES_DIRNAME / f"{series_id}.json"


def write_series(cache_dir: Path, record: SeriesRecord, array: np.ndarray) -> None:
    """Write one series: array first, then its sidecar (the sidecar marks the entry complete)."""
    if tuple(array.shape) != tuple(record.shape) or str(array.dtype) != record.dtype:
        raise ValueError(
            f"series {record.series_id}: array {array.shape}/{array.dtype} does not match its record "
            f"{record.shape}/{record.dtype}"
        )
    if record.array != series_array_path(record.series_id):
        raise ValueError(f"series {record.series_id}: record.array must be {series_array_path(record.series_id)}")
    write_array_atomic(Path(cache_dir) / record.array, array)
    write_json_atomic(sidecar_path(cache_dir, record.series_id), record.to_json())


def read_sidecar(cache_dir: Path, series_id: str) -> SeriesRecord:
    path = sidecar_path(cache_dir, series_id)
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise CacheFormatError(f"{SERIES_DIRNAME}/{path.name}: unreadable sidecar ({e.__class__.__name__})") from e
    return SeriesRecord.from_json(d, where=f"{SERIES_DIRNAME}/{path.name}")


def built_series_ids(cache_dir: Path) -> list[str]:
    """Ids of all series whose sidecar exists (i.e. completely written), sorted."""
    d = Path(cache_dir) / SERIES_DIRNAME
    if not d.is_dir():
        return []
    return sorted(p.stem for p in d.glob("*.json") if not p.name.startswith("."))


def open_series_array(cache_dir: Path, row: SeriesRecord, mmap: bool = True) -> np.ndarray:
    """Open a series' array (memory-mapped by default) and check it against its record.

    Raises:
        CacheEntryError: the file is missing, truncated, or its shape/dtype disagree with the record.
    """
    path = Path(cache_dir) / row.array
    if not path.is_file():
        raise CacheEntryError(row.series_id, "missing_array")
    try:
        arr = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise CacheEntryError(row.series_id, "unreadable_array", e.__class__.__name__) from e
    if tuple(arr.shape) != tuple(row.shape) or str(arr.dtype) != row.dtype:
        raise CacheEntryError(
            row.series_id, "array_mismatch", f"file {arr.shape}/{arr.dtype}, record {row.shape}/{row.dtype}"
        )
    return arr


def check_series_array(cache_dir: Path, row: SeriesRecord) -> None:
    """What :func:`open_series_array` checks, from the ``.npy`` header and the file size alone.

    No memory map is made: ~2.5x cheaper, which counts when ``CacheDataModule.setup`` checks
    100,000 entries (see docs/data_prep.md, "Scale").

    Raises:
        CacheEntryError: missing, unreadable or truncated file, or shape/dtype not the record's.
    """
    path = Path(cache_dir) / row.array
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            npy = np.lib.format
            shape, fortran, dtype = (npy.read_array_header_1_0 if version == (1, 0) else npy.read_array_header_2_0)(f)
            data_start, size = f.tell(), os.fstat(f.fileno()).st_size
    except FileNotFoundError as e:
        raise CacheEntryError(row.series_id, "missing_array") from e
    except (OSError, ValueError, EOFError) as e:
        raise CacheEntryError(row.series_id, "unreadable_array", e.__class__.__name__) from e
    if tuple(shape) != tuple(row.shape) or str(dtype) != row.dtype or fortran:
        raise CacheEntryError(row.series_id, "array_mismatch",
                              f"file {tuple(shape)}/{dtype}, record {row.shape}/{row.dtype}")
    if size - data_start < math.prod(shape) * dtype.itemsize:
        raise CacheEntryError(row.series_id, "unreadable_array", "truncated")


# ----------------------------------------------------------------------------- statistics


def compute_stats(array: np.ndarray) -> dict[str, float]:
    """Intensity statistics stored in a record (``STAT_KEYS``), over all voxels.

    Integer arrays (the common case: int16 HU) go through a histogram: exact same values as
    ``np.percentile``'s linear interpolation, no float64 copy of the volume, and several times faster.
    """
    a = np.asarray(array)
    if a.size == 0:
        raise ValueError("cannot compute statistics of an empty array")
    if a.dtype.kind in "iu" and a.dtype.itemsize <= 2:
        return _integer_stats(a.reshape(-1))
    flat = a.reshape(-1)
    pcts = np.percentile(flat, PERCENTILES)
    stats = {
        "min": float(flat.min()),
        "max": float(flat.max()),
        "mean": float(flat.mean(dtype=np.float64)),
        "std": float(flat.std(dtype=np.float64)),
    }
    stats.update({f"p{p:g}": float(v) for p, v in zip(PERCENTILES, pcts, strict=True)})
    return stats


_HIST_CHUNK = 1 << 20


def _integer_stats(flat: np.ndarray) -> dict[str, float]:
    lo, hi = int(flat.min()), int(flat.max())
    counts = np.zeros(hi - lo + 1, dtype=np.int64)
    for start in range(0, flat.size, _HIST_CHUNK):  # chunks stay in cache: ~4x faster than one bincount
        counts += np.bincount(flat[start : start + _HIST_CHUNK].astype(np.intp) - lo, minlength=len(counts))
    values = np.arange(lo, hi + 1, dtype=np.float64)
    n = flat.size
    mean = float(np.dot(counts, values) / n)
    std = float(np.sqrt(np.dot(counts, (values - mean) ** 2) / n))
    cumulative = np.cumsum(counts)

    def sorted_value(i: int) -> float:  # the i-th smallest voxel value (0-based)
        return float(values[np.searchsorted(cumulative, i, side="right")])

    stats = {"min": float(lo), "max": float(hi), "mean": mean, "std": std}
    for p in PERCENTILES:
        pos = p / 100.0 * (n - 1)
        below = int(np.floor(pos))
        low, high = sorted_value(below), sorted_value(min(below + 1, n - 1))
        stats[f"p{p:g}"] = low + (high - low) * (pos - below)
    return stats
