"""The cache format: the one contract between ``data_prep`` (writer) and ``medmae.data`` (reader).

A cache directory holds::

    CACHE_DIR/
      manifest.json            # schema version + one row per built series (ManifestRow)
      series/<series_id>.npy   # one uncompressed (Z, Y, X) array per series, memory-mappable
      series/<series_id>.json  # sidecar: the SeriesRecord of that array (geometry, stats)
      reject_report.json       # written by data_prep: counts by reason, pseudonymous only

Everything here is pseudonymous: ``series_id`` and ``patient_id`` are keyed hashes made by
data_prep; no name, UID, date, institution or archive path is ever stored (docs/data_prep.md,
"What ends up in the cache").

Arrays are in one canonical orientation: array axes (Z, Y, X) are the voxel axes closest to the
patient's (superior, posterior, left) directions, each increasing that way (DICOM LPS), so an axial
slice ``a[z]`` shows in the usual radiological view (anterior up, patient right on the left).
``affine`` maps the voxel index ``(x, y, z, 1)`` = (column, row, slice) to LPS millimetres; nothing is
resampled, so oblique series keep their obliquity in the affine.

Writes are atomic (temporary file + ``os.replace``): a reader never sees half an entry, and a
sidecar exists only once its array is complete, so the sidecar is the "series is built" marker.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
REJECT_REPORT_NAME = "reject_report.json"
SERIES_DIRNAME = "series"

#: Percentiles stored in every record's ``stats`` (as keys ``"p0.5"``, ``"p1"``, ...).
PERCENTILES: tuple[float, ...] = (0.5, 1.0, 5.0, 50.0, 95.0, 99.0, 99.5)
STAT_KEYS: tuple[str, ...] = ("min", "max", "mean", "std") + tuple(f"p{p:g}" for p in PERCENTILES)
SOURCES = ("dicom", "nifti")
KINDS = ("volume", "image")  # image: a single 2D picture (CR/DX/MG, one slice), stored as Z = 1
SPLITS = ("train", "val")
#: Where a record's ``modality`` came from: the DICOM header, ``--nifti-modality``, a NIfTI's JSON
#: sidecar, its BIDS suffix, or nothing (``OT``); ``unknown`` for caches written before it was recorded.
MODALITY_SOURCES = ("dicom", "option", "sidecar", "bids_suffix", "default", "unknown")
STORAGE_DTYPES = ("int16", "uint16", "uint8", "float32")


class CacheFormatError(ValueError):
    """The cache (or one of its files) does not follow this schema; the message names file and field."""


class CacheEntryError(OSError):
    """One series' array is missing or unreadable; training skips it and counts the reason."""

    def __init__(self, series_id: str, reason: str, detail: str = "") -> None:
        self.series_id = series_id
        self.reason = reason
        super().__init__(f"cache entry {series_id}: {reason}" + (f" ({detail})" if detail else ""))


@dataclass(frozen=True)
class SeriesRecord:
    """What the sidecar of one built series says about its array.

    Attributes:
        series_id: pseudonymous series id (keyed hash; safe to log).
        patient_id: pseudonymous patient id; several series may share it.
        modality: DICOM modality code (``CT``, ``MR``, ``CR``, ``DX``, ``MG``, ...) or ``OT`` when unknown.
        source: ``dicom`` or ``nifti``.
        kind: ``volume`` (Z >= 1 slices of a 3D stack) or ``image`` (one 2D projection image, Z == 1).
        array: path of the ``.npy`` relative to the cache directory.
        shape: array shape (Z, Y, X).
        spacing: voxel spacing (Z, Y, X) in mm; Z is the slice spacing (1.0 for a single image).
        dtype: storage dtype, one of ``STORAGE_DTYPES``.
        intensity: unit of the stored values: ``HU`` for CT (not for CT secondary captures, whose
            pixels are display values), ``raw`` for the modality-LUT output of everything else.
        stats: ``STAT_KEYS`` -> value, over all voxels of the stored array.
        affine: 4x4 row-major, voxel (x, y, z, 1) -> LPS mm.
        modality_source: where ``modality`` came from, one of ``MODALITY_SOURCES`` (optional in the
            file: absent in caches written before it existed, read as ``unknown``).
    """

    series_id: str
    patient_id: str
    modality: str
    source: str
    kind: str
    array: str
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    dtype: str
    intensity: str
    stats: Mapping[str, float]
    affine: tuple[tuple[float, ...], ...]
    modality_source: str = "unknown"

    def to_json(self) -> dict[str, Any]:
        # not dataclasses.asdict: its recursive deep copy was most of the manifest write at 10^4 series
        d = {name: getattr(self, name) for name in _field_names(type(self))}
        d["shape"] = list(self.shape)
        d["spacing"] = list(self.spacing)
        d["affine"] = [list(r) for r in self.affine]
        d["stats"] = dict(self.stats)
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any], where: str) -> SeriesRecord:
        return cls(**_validated_fields(cls, d, where))


@functools.cache
def _field_names(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in fields(cls))


@dataclass(frozen=True)
class ManifestRow(SeriesRecord):
    """A manifest row: the series' record plus its patient-level ``split`` (``train`` / ``val``)."""

    split: str = "train"

    @classmethod
    def from_record(cls, record: SeriesRecord, split: str) -> ManifestRow:
        return cls(**{f.name: getattr(record, f.name) for f in fields(SeriesRecord)}, split=split)


#: the fields of a manifest row, with and without the optional ``modality_source``
_ROW_KEYS = frozenset(f.name for f in fields(ManifestRow))
_ROW_KEYS_WITHOUT_SOURCE = _ROW_KEYS - {"modality_source"}


@dataclass(frozen=True)
class Manifest:
    """The whole manifest: schema version, the split settings and the rows (sorted by ``series_id``).

    ``version`` (set by :func:`load_manifest`, not stored) is the content hash of the file read: a
    prep rerun that changes anything in it gives another version, so a training run can pin the
    one it started on.
    """

    rows: tuple[ManifestRow, ...]
    val_fraction: float
    schema_version: int = SCHEMA_VERSION
    version: str = field(default="", compare=False)

    def to_json(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "val_fraction": self.val_fraction,
            "series": [r.to_json() for r in self.rows],
        }


# ----------------------------------------------------------------------------- validation


def _validated_fields(cls: type, d: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Check presence and type of every field of ``cls`` in ``d``; convert lists to tuples."""
    if not isinstance(d, Mapping):
        raise CacheFormatError(f"{where}: expected an object, got {type(d).__name__}")
    names = {f.name for f in fields(cls)}
    optional = {"modality_source"} | ({"split"} if cls is not ManifestRow else set())
    missing = [n for n in names - optional if n not in d]
    if missing:
        raise CacheFormatError(f"{where}: missing field(s) {sorted(missing)}")
    unknown = sorted(set(d) - names)
    if unknown:
        raise CacheFormatError(f"{where}: unknown field(s) {unknown}")

    def bad(field: str, why: str) -> CacheFormatError:
        return CacheFormatError(f"{where}: field '{field}' {why} (got {d.get(field)!r})")

    out: dict[str, Any] = dict(d)
    for key in ("series_id", "patient_id", "modality", "array", "intensity"):
        if not isinstance(d[key], str) or not d[key]:
            raise bad(key, "must be a non-empty string")
    if d["source"] not in SOURCES:
        raise bad("source", f"must be one of {SOURCES}")
    if d["kind"] not in KINDS:
        raise bad("kind", f"must be one of {KINDS}")
    if d["dtype"] not in STORAGE_DTYPES:
        raise bad("dtype", f"must be one of {STORAGE_DTYPES}")
    shape = d["shape"]
    if not (isinstance(shape, Sequence) and len(shape) == 3 and all(_is_int(s) and s > 0 for s in shape)):
        raise bad("shape", "must be three positive integers (Z, Y, X)")
    out["shape"] = tuple(int(s) for s in shape)
    if d["kind"] == "image" and out["shape"][0] != 1:
        raise bad("shape", "of an 'image' must have Z == 1")
    spacing = d["spacing"]
    if not (
        isinstance(spacing, Sequence)
        and len(spacing) == 3
        and all(_is_number(s) and math.isfinite(s) and s > 0 for s in spacing)
    ):
        raise bad("spacing", "must be three positive finite numbers (Z, Y, X) in mm")
    out["spacing"] = tuple(float(s) for s in spacing)
    stats = d["stats"]
    if not isinstance(stats, Mapping) or any(
        k not in stats or not _is_number(stats[k]) or not math.isfinite(stats[k]) for k in STAT_KEYS
    ):
        raise bad("stats", f"must map each of {STAT_KEYS} to a finite number")
    out["stats"] = {k: float(stats[k]) for k in STAT_KEYS}
    aff = d["affine"]
    if not (
        isinstance(aff, Sequence)
        and len(aff) == 4
        and all(isinstance(r, Sequence) and len(r) == 4 and all(_is_number(v) for v in r) for r in aff)
    ):
        raise bad("affine", "must be a 4x4 list of numbers")
    out["affine"] = tuple(tuple(float(v) for v in r) for r in aff)
    if "modality_source" in d and d["modality_source"] not in MODALITY_SOURCES:
        raise bad("modality_source", f"must be one of {MODALITY_SOURCES}")
    if cls is ManifestRow and d["split"] not in SPLITS:
        raise bad("split", f"must be one of {SPLITS}")
    return out


def _fast_manifest_row(d: Any) -> dict[str, Any] | None:
    """:func:`_validated_fields` for a manifest row as ``json`` parses it, in the common valid case
    (~3x faster: it is most of ``load_manifest`` at 100,000 series). Returns None for anything
    unusual, and the caller then runs :func:`_validated_fields`, which names the problem; it never
    accepts a row that function refuses, and returns what it returns."""
    if type(d) is not dict or (d.keys() != _ROW_KEYS and d.keys() != _ROW_KEYS_WITHOUT_SOURCE):
        return None
    try:
        for key in ("series_id", "patient_id", "modality", "array", "intensity"):
            v = d[key]
            if type(v) is not str or not v:
                return None
        if (d["source"] not in SOURCES or d["kind"] not in KINDS or d["dtype"] not in STORAGE_DTYPES
                or d["split"] not in SPLITS):
            return None
        if "modality_source" in d and d["modality_source"] not in MODALITY_SOURCES:
            return None
        shape, spacing, stats, aff = d["shape"], d["spacing"], d["stats"], d["affine"]
        if type(shape) is not list or len(shape) != 3 or any(type(v) is not int or v <= 0 for v in shape):
            return None
        if d["kind"] == "image" and shape[0] != 1:
            return None
        if type(spacing) is not list or len(spacing) != 3 or not all(
            (type(v) is float or type(v) is int) and math.isfinite(v) and v > 0 for v in spacing
        ):
            return None
        if type(stats) is not dict:
            return None
        values = [stats.get(k) for k in STAT_KEYS]
        if not all((type(v) is float or type(v) is int) and math.isfinite(v) for v in values):
            return None
        if type(aff) is not list or len(aff) != 4 or not all(
            type(r) is list and len(r) == 4 and all(type(v) is float or type(v) is int for v in r) for r in aff
        ):
            return None
        out = dict(d)
        out["shape"] = tuple(shape)
        out["spacing"] = tuple(float(v) for v in spacing)
        out["stats"] = {k: float(v) for k, v in zip(STAT_KEYS, values, strict=True)}
        out["affine"] = tuple(tuple(float(v) for v in r) for r in aff)
        return out
    except (OverflowError, TypeError, ValueError):
        return None


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


# ----------------------------------------------------------------------------- atomic writes


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash leaves either the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, obj: Any) -> None:
    """Atomically write ``obj`` as indented UTF-8 JSON (sorted keys, so reruns are byte-identical).

    Strict JSON: a NaN or +/-Inf anywhere raises ``ValueError`` before anything is written (Python's
    ``Infinity``/``NaN`` tokens are not JSON; other readers refuse them).
    """
    write_bytes_atomic(path, (json.dumps(obj, indent=1, sort_keys=True, allow_nan=False) + "\n").encode("utf-8"))


def write_array_atomic(path: Path, array: np.ndarray) -> None:
    """Atomically save ``array`` as an uncompressed ``.npy`` (memory-mappable by readers)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".npy.tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, np.ascontiguousarray(array), allow_pickle=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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


# ----------------------------------------------------------------------------- manifest


def write_manifest(cache_dir: Path, rows: Iterable[ManifestRow], val_fraction: float) -> Manifest:
    """Atomically write the manifest; rows are sorted by series id so reruns give identical bytes."""
    manifest = Manifest(rows=tuple(sorted(rows, key=lambda r: r.series_id)), val_fraction=float(val_fraction))
    write_json_atomic(Path(cache_dir) / MANIFEST_NAME, manifest.to_json())
    return manifest


def load_manifest(cache_dir: Path) -> Manifest:
    """Read and validate ``manifest.json``.

    Raises:
        FileNotFoundError: no manifest in ``cache_dir`` (was ``medmae prep`` run?).
        CacheFormatError: wrong schema version or a malformed row; the message names row and field.
    """
    path = Path(cache_dir) / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {MANIFEST_NAME} in cache directory {cache_dir}; run `medmae prep` first")
    raw = path.read_bytes()  # one read: prep swaps the file atomically, so these bytes are one version
    try:
        d = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise CacheFormatError(f"{MANIFEST_NAME}: not UTF-8 text") from e
    except json.JSONDecodeError as e:
        raise CacheFormatError(f"{MANIFEST_NAME}: not valid JSON ({e.msg} at line {e.lineno})") from e
    if not isinstance(d, dict):
        raise CacheFormatError(f"{MANIFEST_NAME}: expected an object")
    version = d.get("schema_version")
    if version != SCHEMA_VERSION:
        raise CacheFormatError(
            f"{MANIFEST_NAME}: field 'schema_version' is {version!r}, this medmae reads {SCHEMA_VERSION}; "
            "rebuild the cache with this version's `medmae prep`"
        )
    vf = d.get("val_fraction")
    if not _is_number(vf) or not 0.0 <= vf < 1.0:
        raise CacheFormatError(f"{MANIFEST_NAME}: field 'val_fraction' must be in [0, 1) (got {vf!r})")
    series = d.get("series")
    if not isinstance(series, list):
        raise CacheFormatError(f"{MANIFEST_NAME}: field 'series' must be a list")
    rows = tuple(
        ManifestRow(**(_fast_manifest_row(s) or _validated_fields(ManifestRow, s, f"{MANIFEST_NAME} series[{i}]")))
        for i, s in enumerate(series)
    )
    ids = [r.series_id for r in rows]
    if len(set(ids)) != len(ids):
        raise CacheFormatError(f"{MANIFEST_NAME}: duplicate series_id")
    return Manifest(rows=rows, val_fraction=float(vf), schema_version=version, version=content_version(raw))


def content_version(data: bytes) -> str:
    """The version of a manifest: the first 16 hex digits of the SHA-256 of its bytes (no PHI: the
    manifest is pseudonymous, and a hash of it reveals less)."""
    return hashlib.sha256(data).hexdigest()[:16]



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
