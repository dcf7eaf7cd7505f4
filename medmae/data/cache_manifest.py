"""The manifest: write it, read and validate it, and name its version (content hash).

Split out of ``medmae.data.cache`` (issue 19): the manifest file is the list of built series that
training reads and a run pins by version; its record types live in ``cache_records``, the series
files in ``cache_series``. Import the names from ``medmae.data.cache``, the contract module.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

from medmae.data.cache_records import (
    MANIFEST_NAME,
    SCHEMA_VERSION,
    CacheFormatError,
    Manifest,
    ManifestRow,
    _fast_manifest_row,
    _is_number,
    _validated_fields,
)
from medmae.data.cache_series import write_json_atomic


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
