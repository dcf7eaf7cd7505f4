"""The cache contract: what data_prep writes is what medmae.data validates and reads."""

from pathlib import Path

import numpy as np
import pytest

from medmae.data.cache import (
    MANIFEST_NAME,
    PERCENTILES,
    CacheEntryError,
    CacheFormatError,
    ManifestRow,
    SeriesRecord,
    built_series_ids,
    compute_stats,
    load_manifest,
    open_series_array,
    read_sidecar,
    series_array_path,
    write_manifest,
    write_series,
)

EYE = tuple(tuple(float(i == j) for j in range(4)) for i in range(4))


def record(series_id: str = "s1", array: np.ndarray | None = None, **overrides) -> tuple[SeriesRecord, np.ndarray]:
    array = np.arange(2 * 3 * 4, dtype=np.int16).reshape(2, 3, 4) if array is None else array
    fields = dict(
        series_id=series_id,
        patient_id="p1",
        modality="CT",
        source="dicom",
        kind="volume",
        array=series_array_path(series_id),
        shape=array.shape,
        spacing=(2.0, 0.5, 0.5),
        dtype=str(array.dtype),
        intensity="HU",
        stats=compute_stats(array),
        affine=EYE,
    )
    fields.update(overrides)
    return SeriesRecord(**fields), array


def test_series_and_manifest_round_trip(tmp_path: Path) -> None:
    rec, arr = record()
    write_series(tmp_path, rec, arr)
    assert read_sidecar(tmp_path, "s1") == rec and built_series_ids(tmp_path) == ["s1"]
    written = write_manifest(tmp_path, [ManifestRow.from_record(rec, "val")], val_fraction=0.2)
    assert load_manifest(tmp_path) == written
    mapped = open_series_array(tmp_path, rec)
    assert isinstance(mapped, np.memmap) and np.array_equal(mapped, arr)


def test_manifest_bytes_do_not_depend_on_row_order(tmp_path: Path) -> None:
    rows = [ManifestRow.from_record(record(sid)[0], "train") for sid in ("s2", "s1", "s3")]
    write_manifest(tmp_path / "a", rows, 0.1)
    write_manifest(tmp_path / "b", rows[::-1], 0.1)
    assert (tmp_path / "a" / MANIFEST_NAME).read_bytes() == (tmp_path / "b" / MANIFEST_NAME).read_bytes()


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"schema_version": 99}, "schema_version"),
        ({"val_fraction": 1.5}, "val_fraction"),
        ({"row": {"split": "test"}}, "split"),
        ({"row": {"shape": [2, 3]}}, "shape"),
        ({"row": {"dtype": "float64"}}, "dtype"),
        ({"row": {"stats": {"min": 0}}}, "stats"),
        ({"row": {"patient_name": "x"}}, "patient_name"),
    ],
)
def test_load_manifest_names_the_bad_field(tmp_path: Path, change: dict, field: str) -> None:
    import json

    write_manifest(tmp_path, [ManifestRow.from_record(record()[0], "train")], 0.1)
    doc = json.loads((tmp_path / MANIFEST_NAME).read_text())
    doc["series"][0].update(change.pop("row", {}))
    doc.update(change)
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(doc))
    with pytest.raises(CacheFormatError, match=field):
        load_manifest(tmp_path)


def test_missing_manifest_says_to_run_prep(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="medmae prep"):
        load_manifest(tmp_path)


def test_missing_truncated_and_mismatched_arrays_are_entry_errors(tmp_path: Path) -> None:
    rec, arr = record()
    with pytest.raises(CacheEntryError, match="missing_array"):
        open_series_array(tmp_path, rec)
    write_series(tmp_path, rec, arr)
    path = tmp_path / rec.array
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CacheEntryError) as err:
        open_series_array(tmp_path, rec)
    assert err.value.reason in ("unreadable_array", "array_mismatch")
    other, _ = record(shape=(2, 3, 5))
    write_series(tmp_path, rec, arr)
    with pytest.raises(CacheEntryError, match="array_mismatch"):
        open_series_array(tmp_path, other)


def test_write_series_refuses_an_array_that_disagrees_with_its_record(tmp_path: Path) -> None:
    rec, arr = record()
    with pytest.raises(ValueError, match="does not match"):
        write_series(tmp_path, rec, arr.astype(np.float32))
    assert built_series_ids(tmp_path) == []


@pytest.mark.parametrize("dtype", [np.int16, np.uint16, np.uint8, np.float32])
def test_stats_equal_numpy_in_float64(dtype: type) -> None:
    rng = np.random.default_rng(0)
    info = np.iinfo(dtype) if np.dtype(dtype).kind in "iu" else None
    values = rng.normal(300, 900, size=(7, 33, 21))
    arr = (values.clip(info.min, info.max) if info else values).astype(dtype)
    stats = compute_stats(arr)
    ref = arr.astype(np.float64).reshape(-1)
    expected = np.percentile(ref, PERCENTILES)
    assert [stats[f"p{p:g}"] for p in PERCENTILES] == pytest.approx(expected, rel=1e-6, abs=1e-4)
    assert stats["mean"] == pytest.approx(ref.mean()) and stats["std"] == pytest.approx(ref.std())
    assert (stats["min"], stats["max"]) == (ref.min(), ref.max())


def test_stats_of_the_full_int16_range() -> None:
    stats = compute_stats(np.array([-32768, 32767], dtype=np.int16))
    assert stats["p50"] == -0.5 and stats["p99"] == pytest.approx(-32768 + 0.99 * 65535)


def test_check_series_array_agrees_with_open_series_array(tmp_path: Path) -> None:
    """The header-only check at setup refuses exactly what opening the array refuses, by the same reason."""
    from medmae.data.cache import check_series_array

    arr = np.arange(2 * 3 * 4, dtype=np.int16).reshape(2, 3, 4)
    record = SeriesRecord(series_id="s1", patient_id="p1", modality="CT", source="dicom", kind="volume",
                          array=series_array_path("s1"), shape=(2, 3, 4), spacing=(1.0, 1.0, 1.0), dtype="int16",
                          intensity="HU", stats=compute_stats(arr), affine=tuple(tuple(r) for r in np.eye(4)))
    write_series(tmp_path, record, arr)
    check_series_array(tmp_path, record)
    path = tmp_path / record.array
    cases = {
        "array_mismatch": lambda: np.save(path, arr.astype(np.float32)),
        "unreadable_array": lambda: path.write_bytes(path.read_bytes()[:-1]),  # truncated by one byte
        "missing_array": lambda: path.unlink(),
    }
    for reason, damage in cases.items():
        np.save(path, arr)
        damage()
        for check in (check_series_array, open_series_array):
            with pytest.raises(CacheEntryError) as err:
                check(tmp_path, record)
            assert err.value.reason == reason, (check.__name__, reason)


def test_fast_manifest_rows_accept_only_what_the_validator_accepts() -> None:
    """load_manifest's fast path returns the validator's result for valid rows and defers every
    malformed one to it (which then names the field)."""
    import copy
    import json

    from medmae.data.cache import _fast_manifest_row, _validated_fields

    arr = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
    good = json.loads(json.dumps(ManifestRow(
        series_id="s1", patient_id="p1", modality="CT", source="dicom", kind="volume", array=series_array_path("s1"),
        shape=(2, 3, 4), spacing=(1.0, 0.5, 0.5), dtype="int16", intensity="HU", stats=compute_stats(arr),
        affine=EYE, modality_source="dicom", split="train").to_json()))
    assert _fast_manifest_row(good) == _validated_fields(ManifestRow, good, "x")
    legacy = {k: v for k, v in good.items() if k != "modality_source"}
    assert _fast_manifest_row(legacy) == _validated_fields(ManifestRow, legacy, "x")
    mutations = {
        "series_id": ["", 3, None], "source": ["pacs", None], "kind": ["movie"], "dtype": ["int64"],
        "split": ["test", None], "modality_source": [None, "guess"], "shape": [[2, 3], [2, 3, 0], [2, 3, 4.0],
        [True, 3, 4], "abc"], "spacing": [[1, 1, float("inf")], [1, 1, 0], [1, 1, True], [1, 1]],
        "stats": [{}, {**good["stats"], "p50": float("nan")}, {**good["stats"], "min": "0"}, []],
        "affine": [[[1, 0, 0, 0]] * 3, [[1, 0, 0, "0"]] * 4, [[1, 0, 0, True]] * 4],
    }
    for key, values in mutations.items():
        for value in values:
            row = copy.deepcopy(good)
            row[key] = value
            with pytest.raises(CacheFormatError):
                _validated_fields(ManifestRow, row, "x")
            assert _fast_manifest_row(row) is None, (key, value)
    image = {**copy.deepcopy(good), "kind": "image"}  # Z == 2 is not an image
    assert _fast_manifest_row(image) is None
    assert _fast_manifest_row({**good, "extra": 1}) is None and _fast_manifest_row([good]) is None


def test_atomic_writers_replace_whole_files_and_leave_the_old_one_when_a_write_fails(tmp_path: Path) -> None:
    """A failure half-way (here: an object ``np.save`` refuses without pickle) keeps the previous file
    intact and leaves no temporary beside it; a success replaces the file whole."""
    from medmae.data.cache_series import write_array_atomic, write_bytes_atomic

    array_path, bytes_path = tmp_path / "sub" / "a.npy", tmp_path / "b.bin"
    write_array_atomic(array_path, np.arange(6, dtype=np.int16).reshape(2, 3))
    write_bytes_atomic(bytes_path, b"first")
    with pytest.raises(ValueError):
        write_array_atomic(array_path, np.array([object()], dtype=object))
    np.testing.assert_array_equal(np.load(array_path), np.arange(6, dtype=np.int16).reshape(2, 3))
    write_bytes_atomic(bytes_path, b"second")
    assert bytes_path.read_bytes() == b"second"
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["a.npy", "b.bin"]
