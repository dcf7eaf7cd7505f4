"""Small caches written through ``medmae.data.cache`` (the same writer API data_prep uses)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from medmae.data.cache import (
    ManifestRow,
    SeriesRecord,
    compute_stats,
    series_array_path,
    write_manifest,
    write_series,
)


def spacing_affine(spacing: tuple[float, float, float]) -> tuple[tuple[float, ...], ...]:
    """The axis-aligned affine of a (Z, Y, X) spacing: voxel (x, y, z, 1) -> mm, as data_prep writes it."""
    sz, sy, sx = spacing
    diagonal = (sx, sy, sz, 1.0)
    return tuple(tuple(diagonal[i] if i == j else 0.0 for j in range(4)) for i in range(4))


def make_record(
    series_id: str,
    array: np.ndarray,
    *,
    modality: str = "CT",
    kind: str = "volume",
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
    split: str = "train",
    source: str = "dicom",
    patient_id: str | None = None,
) -> ManifestRow:
    """The manifest row of ``array`` (HU for CT, raw otherwise), without writing anything."""
    record = SeriesRecord(
        series_id=series_id,
        patient_id=patient_id or f"p-{series_id}",
        modality=modality,
        source=source,
        kind=kind,
        array=series_array_path(series_id),
        shape=tuple(int(s) for s in array.shape),
        spacing=spacing,
        dtype=str(array.dtype),
        intensity="HU" if modality == "CT" else "raw",
        stats=compute_stats(array),
        affine=spacing_affine(spacing),
    )
    return ManifestRow.from_record(record, split)


def shape_row(series_id: str, shape: tuple[int, int, int], **kwargs) -> ManifestRow:
    """A row for an array of ``shape`` (for index tests that never read arrays)."""
    return make_record(series_id, np.zeros(shape, dtype=np.int16), **kwargs)


class CacheBuilder:
    """Collects series, then writes arrays, sidecars and the manifest into ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.rows: list[ManifestRow] = []

    def add(self, series_id: str, array: np.ndarray, **kwargs) -> ManifestRow:
        row = make_record(series_id, array, **kwargs)
        write_series(self.root, row, array)
        self.rows.append(row)
        return row

    def write(self) -> Path:
        write_manifest(self.root, self.rows, val_fraction=0.1)
        return self.root

    def array_path(self, series_id: str) -> Path:
        return self.root / series_array_path(series_id)


@pytest.fixture
def cache_builder(tmp_path: Path) -> CacheBuilder:
    return CacheBuilder(tmp_path / "cache")


def slice_ramp(n_slices: int, size: int = 40, step: int = 10) -> np.ndarray:
    """A volume whose slice ``z`` holds the value ``step * z`` everywhere (int16)."""
    return (np.arange(n_slices, dtype=np.int16)[:, None, None] * step).repeat(size, 1).repeat(size, 2)


def noise_volume(seed: int, shape: tuple[int, int, int] = (10, 48, 48)) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 300, shape).astype(np.int16)


@pytest.fixture
def noise_cache(cache_builder: CacheBuilder) -> Callable[..., Path]:
    """Three CT train series of noise, one val series and one X-ray image."""

    def build() -> Path:
        for i in range(3):
            cache_builder.add(f"ct{i}", noise_volume(i))
        cache_builder.add("val0", noise_volume(7), split="val")
        xray = np.random.default_rng(5).integers(0, 4000, (1, 60, 50)).astype(np.uint16)
        cache_builder.add("xr0", xray, modality="DX", kind="image")
        return cache_builder.write()

    return build
