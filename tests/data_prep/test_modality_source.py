"""The record field ``modality_source`` (issue 9): written by prep, optional for caches written before
it existed, strictly validated when present."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from medmae.data.cache import (
    MANIFEST_NAME,
    CacheFormatError,
    ManifestRow,
    SeriesRecord,
    compute_stats,
    load_manifest,
    read_sidecar,
    series_array_path,
    write_manifest,
    write_series,
)

EYE = tuple(tuple(float(i == j) for j in range(4)) for i in range(4))


def _record(**overrides) -> tuple[SeriesRecord, np.ndarray]:
    array = np.zeros((1, 2, 2), np.int16)
    fields = dict(series_id="s1", patient_id="p1", modality="CT", source="nifti", kind="volume",
                  array=series_array_path("s1"), shape=(1, 2, 2), spacing=(1.0, 1.0, 1.0), dtype="int16",
                  intensity="HU", stats=compute_stats(array), affine=EYE, modality_source="sidecar")
    fields.update(overrides)
    return SeriesRecord(**fields), array


_ABSENT = object()


def _drop_or_set(doc: dict, value: object) -> None:
    """Rewrite one record: without ``modality_source`` (``_ABSENT``), or with ``value``."""
    if value is _ABSENT:
        doc.pop("modality_source")
    else:
        doc["modality_source"] = value


def test_round_trip(tmp_path: Path) -> None:
    rec, arr = _record()
    write_series(tmp_path, rec, arr)
    write_manifest(tmp_path, [ManifestRow.from_record(rec, "train")], 0.1)
    assert read_sidecar(tmp_path, "s1").modality_source == "sidecar"
    assert load_manifest(tmp_path).rows[0].modality_source == "sidecar"


def test_caches_written_before_the_field_still_load(tmp_path: Path) -> None:
    rec, arr = _record()
    write_series(tmp_path, rec, arr)
    write_manifest(tmp_path, [ManifestRow.from_record(rec, "val")], 0.1)
    for path in (tmp_path / "series" / "s1.json", tmp_path / MANIFEST_NAME):
        doc = json.loads(path.read_text())
        for row in doc.get("series", [doc]):
            _drop_or_set(row, _ABSENT)
        path.write_text(json.dumps(doc))
    assert read_sidecar(tmp_path, "s1").modality_source == "unknown"
    row = load_manifest(tmp_path).rows[0]
    assert (row.modality_source, row.split, row.modality) == ("unknown", "val", "CT")


@pytest.mark.parametrize("value", [None, 1, True, "", "Sidecar", ["sidecar"], {"a": 1}])
def test_a_bad_value_is_named(tmp_path: Path, value: object) -> None:
    rec, arr = _record()
    write_series(tmp_path, rec, arr)
    write_manifest(tmp_path, [ManifestRow.from_record(rec, "train")], 0.1)
    for path in (tmp_path / "series" / "s1.json", tmp_path / MANIFEST_NAME):
        doc = json.loads(path.read_text())
        for row in doc.get("series", [doc]):
            _drop_or_set(row, value)
        path.write_text(json.dumps(doc))
    with pytest.raises(CacheFormatError, match="modality_source"):
        read_sidecar(tmp_path, "s1")
    with pytest.raises(CacheFormatError, match="modality_source"):
        load_manifest(tmp_path)
