"""The columnar series table behind the indices (issue 20): exact records, no per-series Python object,
and the same samples, bit for bit, as the row-based reading it replaced, in the main process and in
DataLoader workers."""

from __future__ import annotations

import gc
import math
import types
from collections import Counter
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from medmae.data.cache import ManifestRow, SeriesRecord, load_manifest
from medmae.data.dataset import CacheSliceDataset
from medmae.data.index import AXES, SliceIndex, axis_spacing, plane_geometry
from medmae.data.intensity import IntensityRule
from medmae.data.reader import plane_view
from medmae.data.series_table import SeriesTable
from medmae.data.transforms import SliceTransform
from medmae.data.volume import VolumeIndex, VolumeOptions, VolumeTransform, select_volumes, series_extent_mm
from medmae.data.volume_dataset import CacheVolumeDataset
from tests.data.conftest import CacheBuilder, noise_volume, shape_row


def mixed_rows(n: int = 12) -> list[ManifestRow]:
    """Rows of every kind the table stores: volumes and images, several modalities, sources, splits,
    dtypes, anisotropic spacings, shared patients, a non-ASCII id."""
    rows = []
    for i in range(n):
        if i % 4 == 3:
            rows.append(shape_row(f"xr{i}", (1, 20 + i, 30), modality="DX", kind="image", patient_id=f"p{i // 2}"))
        else:
            spacing = (0.625 * (1 + i % 3), 0.7 + 0.01 * i, 0.7 + 0.01 * i)
            rows.append(
                shape_row(
                    f"v{i}",
                    (5 + i, 24, 28 + i),
                    modality=("CT", "MR")[i % 2],
                    spacing=spacing,
                    source=("dicom", "nifti")[i % 2],
                    split=("train", "val")[i % 5 == 0],
                    patient_id=f"p{i // 2}",
                )
            )
    rows.append(
        ManifestRow(
            **{
                **rows[0].__dict__,
                "series_id": "séries-é",
                "dtype": "float32",
                "modality_source": "sidecar",
                "stats": {**rows[0].stats, "mean": 1.0 / 3.0},
            }
        )
    )
    return rows


def test_records_rebuilt_from_the_columns_equal_the_rows() -> None:
    rows = mixed_rows()
    plain = SeriesRecord(**{k: v for k, v in rows[1].__dict__.items() if k != "split"})
    table = SeriesTable.from_rows([*rows, plain])
    assert len(table) == len(rows) + 1
    for i, row in enumerate(rows):
        rebuilt = table.row(i)
        assert type(rebuilt) is ManifestRow and rebuilt == row
        assert rebuilt.stats == row.stats and list(rebuilt.stats) == list(row.stats)
    assert type(table.row(len(rows))) is SeriesRecord and table.row(len(rows)) == plain
    assert table.series_ids[len(rows) - 1] == "séries-é"
    index = SliceIndex(rows)
    assert index.rows == rows and index.rows[-1] == rows[-1] and index.rows[1:3] == tuple(rows[1:3])
    assert [r.series_id for r in index.rows] == [r.series_id for r in rows]
    assert SliceIndex([]).rows == [] and len(SeriesTable.from_rows([])) == 0


def test_hand_made_stats_round_trip_and_a_key_outside_the_schema_is_refused() -> None:
    row = shape_row("a", (2, 8, 8))
    partial = ManifestRow(**{**row.__dict__, "stats": {"p0.5": 1.0, "p99.5": float("nan")}})
    rebuilt = SeriesTable.from_rows([row, partial]).row(1)
    assert rebuilt.stats.keys() == {"p0.5", "p99.5"} and rebuilt.stats["p0.5"] == 1.0
    assert math.isnan(rebuilt.stats["p99.5"])
    with pytest.raises(ValueError, match="stats key 'p42'"):
        SeriesTable.from_rows([ManifestRow(**{**row.__dict__, "stats": {**row.stats, "p42": 1.0}})])


def test_records_need_no_init_logic() -> None:
    """``SeriesTable.row`` fills the frozen dataclass' fields without calling ``__init__`` (speed);
    that is the same object only while construction does nothing else."""
    for cls in (SeriesRecord, ManifestRow):
        assert not hasattr(cls, "__post_init__") and not hasattr(cls, "__slots__")


@pytest.mark.parametrize("axis", list(AXES))
def test_index_columns_are_the_row_functions(axis: str) -> None:
    rows = mixed_rows()
    index = SliceIndex(rows, axis)
    for i, row in enumerate(rows):
        assert tuple(int(v) for v in (index.n_slices[i], *index.plane_shape(i))) == plane_geometry(row, axis)
        assert index.axis_spacing(i) == axis_spacing(row, axis)


def _old_composition(rows: list[ManifestRow], n_slices: np.ndarray) -> dict[str, object]:
    """``SliceIndex.composition`` as it was computed from the rows."""

    def counts(members: Any) -> dict[str, int]:
        return {
            "series": len(members),
            "slices": int(sum(int(n_slices[i]) for i in members)),
            "patients": len({rows[i].patient_id for i in members}),
        }

    def by(field: str) -> dict[str, dict[str, int]]:
        groups: dict[str, list[int]] = {}
        for i, row in enumerate(rows):
            groups.setdefault(str(getattr(row, field)), []).append(i)
        return {key: counts(members) for key, members in sorted(groups.items())}

    return {**counts(range(len(rows))), "by_modality": by("modality"), "by_source": by("source"), "by_kind": by("kind")}


@pytest.mark.parametrize("axis", list(AXES))
def test_describe_and_composition_are_the_row_based_counts(axis: str) -> None:
    rows = mixed_rows(30)
    index = SliceIndex(rows, axis)
    assert index.composition() == _old_composition(rows, index.n_slices)
    assert index.describe() == {
        "series": len(rows),
        "slices": int(index.n_slices.sum()),
        "kinds": dict(sorted(Counter(r.kind for r in rows).items())),
        "modalities": dict(sorted(Counter(r.modality for r in rows).items())),
    }
    empty = SliceIndex([], axis)
    assert empty.composition() == _old_composition([], empty.n_slices)
    assert empty.describe() == {"series": 0, "slices": 0, "kinds": {}, "modalities": {}}


def test_volume_index_weights_are_the_row_based_ones_exactly() -> None:
    rows = [r for r in mixed_rows(30) if r.kind == "volume"]
    options = VolumeOptions(size=(8, 12, 16), spacing_mm=(1.5, 0.9, 1.1))
    index = VolumeIndex(rows, options, alpha=0.7)
    fov = math.prod(options.fov_mm)
    old = np.array([max(math.prod(series_extent_mm(r)) / fov, 1e-6) for r in rows], dtype=np.float64)
    assert np.array_equal(index.sizes, old)
    assert index.rows == rows
    assert index.describe() == {
        "series": len(rows),
        "modalities": dict(sorted(Counter(r.modality for r in rows).items())),
    }
    assert index.composition() == SliceIndex(rows, "axial", 0.7).composition()


# ----------------------------------------------------------------------------- no per-series object


def _reachable(root: object) -> list[object]:
    """Every object reachable from ``root`` through containers and instances; modules, classes and
    functions (shared code, not data) are not entered."""
    seen: dict[int, object] = {}
    stack = [root]
    skip = (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType, types.MethodType)
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, skip):
            continue
        seen[id(obj)] = obj
        stack.extend(gc.get_referents(obj))
    return list(seen.values())


def _slice_dataset(cache, n: int | None = None) -> CacheSliceDataset:
    rows = [r for r in load_manifest(cache).rows if r.split == "train"][:n]
    rule = IntensityRule.checked(foreground_fraction=0.2)
    return CacheSliceDataset(cache, SliceIndex(rows, "coronal"), SliceTransform((12, 12), slices=3, intensity=rule))


def test_datasets_hold_no_python_object_per_series(cache_builder: CacheBuilder) -> None:
    for i in range(40):
        cache_builder.add(
            f"s{i:02d}", noise_volume(i, (6, 20, 24)), modality=("CT", "MR")[i % 2], patient_id=f"p{i // 2}"
        )
    cache = cache_builder.write()
    small, large = _slice_dataset(cache, 4), _slice_dataset(cache)
    for ds in (small, large):
        ds[(0, 0, 1)]  # a sample read: the reader has an open map
        for array in ds.index.table.columns():
            assert isinstance(array, np.ndarray) and array.dtype.kind in "biuf", array.dtype
        reachable = _reachable(ds)
        assert not [o for o in reachable if isinstance(o, SeriesRecord)]
        assert not [o for o in reachable if isinstance(o, np.ndarray) and o.dtype.kind == "O"]

    # the same Python objects whatever the number of series: only the arrays grow
    def kinds(ds: CacheSliceDataset) -> Counter[str]:
        return Counter(type(o).__name__ for o in _reachable(ds) if not isinstance(o, np.ndarray))

    assert kinds(small) == kinds(large)
    options = VolumeOptions(size=8, spacing_mm=2.0, min_coverage=0.1)
    rows = select_volumes(load_manifest(cache).rows, split="train", options=options).rows
    volumes = CacheVolumeDataset(cache, VolumeIndex(rows, options), VolumeTransform(options, IntensityRule()))
    volumes[(0, 0, 3)]
    assert not [o for o in _reachable(volumes) if isinstance(o, SeriesRecord)]


# ----------------------------------------------------------------------------- the same samples


class RowSliceDataset(CacheSliceDataset):
    """The 2D dataset reading per-series data from ``ManifestRow`` objects, as before issue 20."""

    def __init__(self, rows: list[ManifestRow], *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.old_rows = rows

    def _attempt(self, position: int, rng: np.random.Generator) -> tuple[Any, ...]:
        series, centre = self.index.locate(position)
        row = self.old_rows[series]
        n, h, w = plane_geometry(row, self.index.axis)
        box, flip = self.transform.plan(rng, (h, w), self.random_crop)
        pick = self.transform.pick_planes(centre, n, axis_spacing(row, self.index.axis))
        self._check_known_bad(series)
        view = plane_view(np.load(self.reader.cache_dir / row.array, mmap_mode="r"), row.kind, self.index.axis)
        if flip:
            cols = slice(box.left + box.width - 1, box.left - 1 if box.left > 0 else None, -1)
        else:
            cols = slice(box.left, box.left + box.width)
        slab = pick.channels(np.asarray(view[pick.indices, box.top : box.top + box.height, cols]))
        return series, centre, flip, slab, row


def _sample_cache(cache_builder: CacheBuilder):
    for i in range(9):
        vol = noise_volume(i, (5 + 2 * i, 30 - i, 26 + i))
        vol[:, : vol.shape[1] * 2 // 3] = -1000  # air, for the foreground filter to reject
        cache_builder.add(f"s{i}", vol, modality=("CT", "MR", "CT")[i % 3], spacing=(1.0 + i % 2, 0.8, 0.8))
    cache_builder.add("xr", noise_volume(99, (1, 30, 30)).astype(np.uint16), modality="DX", kind="image")
    return cache_builder.write()


@pytest.mark.parametrize("axis", ["axial", "sagittal"])
def test_samples_are_the_row_based_ones_bit_for_bit(cache_builder: CacheBuilder, axis: str) -> None:
    cache = _sample_cache(cache_builder)
    rows = [r for r in load_manifest(cache).rows if r.split == "train"]
    rule = IntensityRule.checked(foreground_fraction=0.3, percentiles=(1.0, 99.0))
    transform = SliceTransform((16, 16), slices=3, intensity=rule)
    new = CacheSliceDataset(cache, SliceIndex(rows, axis), transform, seed=5)
    old = RowSliceDataset(rows, cache, SliceIndex(rows, axis), transform, seed=5)
    keys = [(e, d, int(p)) for e in range(2) for d, p in enumerate(new.index.draw(np.random.default_rng(e), 40))]
    for key in [*keys, 0, 3, len(new) - 1]:
        a, b = new[key], old[key]
        assert a.keys() == b.keys() and torch.equal(a["image"], b["image"]), key
        assert {k: v for k, v in a.items() if k != "image"} == {k: v for k, v in b.items() if k != "image"}
    assert new.rejected_count == old.rejected_count > 0


def test_worker_batches_are_the_row_based_ones(cache_builder: CacheBuilder) -> None:
    """What forked DataLoader workers return equals the row-based reference of the main process."""
    cache = _sample_cache(cache_builder)
    rows = [r for r in load_manifest(cache).rows if r.split == "train"]
    transform = SliceTransform((16, 16), slices=2, intensity=IntensityRule.checked(foreground_fraction=0.3))
    new = CacheSliceDataset(cache, SliceIndex(rows), transform, seed=1)
    old = RowSliceDataset(rows, cache, SliceIndex(rows), transform, seed=1)
    keys = [(0, d, int(p)) for d, p in enumerate(new.index.draw(np.random.default_rng(0), 24))]
    loader = DataLoader(new, batch_size=6, sampler=keys, num_workers=2, multiprocessing_context="fork")
    reference = DataLoader(old, batch_size=6, sampler=keys, num_workers=0)
    for got, want in zip(loader, reference, strict=True):
        assert torch.equal(got["image"], want["image"])
        assert torch.equal(got["series"], want["series"]) and torch.equal(got["slice"], want["slice"])
