"""The records of the cache format: constants, errors, ``SeriesRecord`` / ``ManifestRow`` / ``Manifest``
and their validation.

Split out of ``medmae.data.cache`` (issue 19) because the record types and the rules a row must
follow are one concern, read by everything; how manifests and series files are written and read
(``cache_manifest``, ``cache_series``) builds on them. Import the names from ``medmae.data.cache``,
the contract module (``data_prep`` may import nothing else from medmae); this module needs only the
standard library, so ``medmae prep`` pays for no heavy import.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

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
