"""Samples read from real (tiny) caches: channel order, orientation, windows, foreground, skips."""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest
import torch

from medmae.data import (
    CacheDataModule,
    CacheSliceDataset,
    SampleKey,
    SamplingOptions,
    SelectionOptions,
    SliceIndex,
    SliceTransform,
)
from medmae.data.cache import load_manifest
from medmae.data.intensity import IntensityRule
from tests.data.conftest import CacheBuilder, noise_volume, slice_ramp

# A window showing 0..1000 HU: a stored value v comes out as v / 1000.
RAMP_WINDOW = [(500.0, 1000.0)]


def _dataset(cache, slices: int = 1, axis: str = "axial", random_crop: bool = False, **transform) -> CacheSliceDataset:
    rows = load_manifest(cache).rows
    index = SliceIndex([r for r in rows if r.split == "train"], axis=axis)
    rule = IntensityRule.checked(ct_windows=RAMP_WINDOW)
    t = SliceTransform(transform.pop("out_size", (16, 16)), slices=slices, intensity=rule, **transform)
    return CacheSliceDataset(cache, index, t, seed=0, random_crop=random_crop)


@pytest.mark.parametrize("slices", [1, 3, 4])
@pytest.mark.parametrize("random_crop", [False, True])
def test_25d_channels_are_adjacent_slices_in_order(cache_builder: CacheBuilder, slices: int, random_crop: bool) -> None:
    cache_builder.add("ramp", slice_ramp(12))  # slice z holds 10 * z HU -> z / 100 after the window
    ds = _dataset(cache_builder.write(), slices=slices, random_crop=random_crop)
    offsets = np.arange(slices) - (slices - 1) // 2
    for z in range(12):
        key = SampleKey(0, z, z) if random_crop else z
        sample = ds[key]
        assert sample["image"].shape == (slices, 16, 16) and sample["slice"] == z
        expected = np.clip(z + offsets, 0, 11) / 100
        np.testing.assert_allclose(sample["image"].mean(dim=(1, 2)).numpy(), expected, atol=1e-5)
        assert float(sample["image"].std(dim=(1, 2)).max()) < 1e-5


def test_single_image_repeats_its_plane_in_25d(cache_builder: CacheBuilder) -> None:
    xray = np.random.default_rng(0).integers(0, 4000, (1, 40, 30)).astype(np.uint16)
    cache_builder.add("xr", xray, modality="DX", kind="image")
    ds = _dataset(cache_builder.write(), slices=3, random_crop=True)
    image = ds[SampleKey(0, 0, 0)]["image"]
    assert image.shape == (3, 16, 16) and image.std() > 0.05
    torch.testing.assert_close(image[0], image[1])
    torch.testing.assert_close(image[1], image[2])


@pytest.mark.parametrize("axis", ["coronal", "sagittal"])
def test_non_axial_planes_show_superior_at_the_top(cache_builder: CacheBuilder, axis: str) -> None:
    z, y, x = np.indices((40, 30, 20))
    cache_builder.add("vol", (z * 10 + x).astype(np.int16))  # value / 1000 after the window
    cache = cache_builder.write()
    # coronal planes are (Z, X) = 40 x 20, sagittal (Z, Y) = 40 x 30: centre crops are 20² / 30², no resize
    side = 20 if axis == "coronal" else 30
    ds = _dataset(cache, slices=3, axis=axis, out_size=(side, side))
    n = 30 if axis == "coronal" else 20
    assert len(ds) == n
    image = ds[5]["image"]
    top = (40 - side) // 2
    rows = np.arange(side)
    z_of_row = 39 - (top + rows)  # superior (high z) first
    if axis == "sagittal":  # channels are x = 4, 5, 6 ; the value does not depend on y (columns)
        expected = (z_of_row[None, :, None] * 10 + np.array([4, 5, 6])[:, None, None]) / 1000
        expected = np.broadcast_to(expected, (3, side, side))
    else:  # channels are y = 4, 5, 6 (value independent of y) ; columns are x = 0..19
        expected = (z_of_row[:, None] * 10 + np.arange(side)[None, :]) / 1000
        expected = np.broadcast_to(expected, (3, side, side))
    np.testing.assert_allclose(image.numpy(), expected, atol=1e-5)


def test_ct_slices_are_windowed_from_hu(cache_builder: CacheBuilder) -> None:
    hu = [-1000, -160, -60, 40, 240, 1500]
    volume = np.repeat(np.array(hu, np.int16)[:, None, None], 32, 1).repeat(32, 2)
    cache_builder.add("hu", volume)
    cache = cache_builder.write()
    index = SliceIndex(load_manifest(cache).rows)
    t = SliceTransform((8, 8), intensity=IntensityRule.checked(ct_windows=[(40, 400)]))
    ds = CacheSliceDataset(cache, index, t, random_crop=True)
    got = [float(ds[SampleKey(0, i, i)]["image"].mean()) for i in range(len(hu))]
    np.testing.assert_allclose(got, [0.0, 0.0, 0.25, 0.5, 1.0, 1.0], atol=1e-6)


def _air_and_body(builder: CacheBuilder) -> None:
    builder.add("air", np.full((20, 48, 48), -1000, np.int16))
    body = np.full((10, 48, 48), -1000, np.int16)
    yy, xx = np.indices((48, 48))
    body[:, (yy - 24) ** 2 + (xx - 24) ** 2 < 22**2] = 40
    builder.add("body", body)


def test_foreground_filter_replaces_air_crops(cache_builder: CacheBuilder) -> None:
    _air_and_body(cache_builder)
    cache = cache_builder.write()
    index = SliceIndex(load_manifest(cache).rows, alpha=1.0)  # 2/3 of the draws land in the air series
    keys = [SampleKey(0, i, p) for i, p in enumerate(index.draw(np.random.default_rng(0), 60))]
    unfiltered = CacheSliceDataset(cache, index, SliceTransform((16, 16)), random_crop=True)
    assert sum(unfiltered[k]["series"] == 0 for k in keys) > 20
    t = SliceTransform((16, 16), intensity=IntensityRule.checked(foreground_fraction=0.3))
    filtered = CacheSliceDataset(cache, index, t, random_crop=True)
    samples = [filtered[k] for k in keys]
    assert all(s["series"] == 1 for s in samples)
    assert sum(s["rejected"] for s in samples) == filtered.rejected_count > 20
    assert all(float(s["image"].mean()) > 0.15 for s in samples)  # soft tissue shows at 0.5


def test_foreground_filter_gives_up_after_its_tries(cache_builder: CacheBuilder) -> None:
    cache_builder.add("air", np.full((5, 32, 32), -1000, np.int16))
    cache = cache_builder.write()
    index = SliceIndex(load_manifest(cache).rows)
    t = SliceTransform((8, 8), intensity=IntensityRule.checked(foreground_fraction=0.3))
    ds = CacheSliceDataset(cache, index, t, foreground_tries=3)
    sample = ds[0]
    assert sample["rejected"] == 3 and sample["image"].shape == (1, 8, 8)


def test_unreadable_entries_at_training_time_are_skipped_and_counted(
    cache_builder: CacheBuilder, caplog: pytest.LogCaptureFixture
) -> None:
    for i in range(4):
        cache_builder.add(f"ct{i}", noise_volume(i))
    cache = cache_builder.write()
    dm = CacheDataModule(str(cache), img_size=16, batch_size=4, num_workers=0, selection=SelectionOptions(min_size=8),
                         sampling=SamplingOptions(samples_per_epoch=40))
    dm.setup("fit")
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(0)
    first = next(iter(loader))  # opens (maps) some arrays
    assert int(first["skipped"].sum()) == 0
    # now damage the cache under the running loader: one array deleted, one truncated in place
    os.remove(cache_builder.array_path("ct1"))
    path = cache_builder.array_path("ct2")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    caplog.set_level(logging.WARNING, logger="medmae.data")
    batches = list(loader)
    assert len(batches) == 10
    series = torch.cat([b["series"] for b in batches])
    assert not ({1, 2} & set(series.tolist()))  # nothing came from the damaged entries
    skipped = int(sum(b["skipped"].sum() for b in batches))
    ds = dm.train_dataset
    assert skipped == sum(ds.skip_counts.values()) > 0
    assert set(ds.skip_counts) == {"missing_array", "truncated_array"}
    messages = [r.getMessage() for r in caplog.records if "skipping cache entry" in r.getMessage()]
    assert len(messages) == 2  # once per entry, with the pseudonymous id and reason only
    assert any("ct1: missing_array" in m for m in messages) and any("ct2: truncated_array" in m for m in messages)
    assert not any(str(cache) in m for m in messages)


def test_read_failures_without_end_raise_a_clear_error(cache_builder: CacheBuilder) -> None:
    cache_builder.add("only", noise_volume(0))
    cache = cache_builder.write()
    index = SliceIndex(load_manifest(cache).rows)
    ds = CacheSliceDataset(cache, index, SliceTransform((8, 8)), max_read_failures=4)
    os.remove(cache_builder.array_path("only"))
    with pytest.raises(RuntimeError, match="4 cache entries in a row could not be read"):
        ds[0]
