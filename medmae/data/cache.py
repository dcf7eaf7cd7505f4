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

This module is the contract's one entry point: ``data_prep`` imports from here and nowhere else in
medmae. Its names live, by concern, in three modules that need nothing heavier than numpy (issue 19):
``cache_records`` (constants, errors, the record types and their validation), ``cache_series`` (atomic
writes, one series' array and sidecar, array checks, statistics) and ``cache_manifest`` (the manifest:
write, read, version).
"""

from __future__ import annotations

from medmae.data.cache_manifest import content_version, load_manifest, write_manifest

# noqa F401: the validators' private helpers (_fast_manifest_row, ...) stay importable from here too
from medmae.data.cache_records import (  # noqa: F401
    KINDS,
    MANIFEST_NAME,
    MODALITY_SOURCES,
    PERCENTILES,
    REJECT_REPORT_NAME,
    SCHEMA_VERSION,
    SERIES_DIRNAME,
    SOURCES,
    SPLITS,
    STAT_KEYS,
    STORAGE_DTYPES,
    CacheEntryError,
    CacheFormatError,
    Manifest,
    ManifestRow,
    SeriesRecord,
    _fast_manifest_row,
    _is_int,
    _is_number,
    _validated_fields,
)
from medmae.data.cache_series import (
    built_series_ids,
    check_series_array,
    compute_stats,
    open_series_array,
    read_sidecar,
    series_array_path,
    sidecar_path,
    write_array_atomic,
    write_bytes_atomic,
    write_json_atomic,
    write_series,
)

__all__ = [
    "KINDS",
    "MANIFEST_NAME",
    "MODALITY_SOURCES",
    "PERCENTILES",
    "REJECT_REPORT_NAME",
    "SCHEMA_VERSION",
    "SERIES_DIRNAME",
    "SOURCES",
    "SPLITS",
    "STAT_KEYS",
    "STORAGE_DTYPES",
    "CacheEntryError",
    "CacheFormatError",
    "Manifest",
    "ManifestRow",
    "SeriesRecord",
    "built_series_ids",
    "check_series_array",
    "compute_stats",
    "content_version",
    "load_manifest",
    "open_series_array",
    "read_sidecar",
    "series_array_path",
    "sidecar_path",
    "write_array_atomic",
    "write_bytes_atomic",
    "write_json_atomic",
    "write_manifest",
    "write_series",
]
