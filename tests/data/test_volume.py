"""3D samples from the cache: geometry in millimetres, selection, foreground retries, reads, datamodule."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from medmae.data import CacheDataModule, IntensityOptions, LoaderOptions
from medmae.data.cache import load_manifest
from medmae.data.intensity import IntensityRule
from medmae.data.reader import SeriesReader
from medmae.data.volume import (
    VolumeCrop,
    VolumeIndex,
    VolumeOptions,
    VolumeTransform,
    plan_crop,
    resample_volume,
    restore_volume,
    select_volumes,
)
from medmae.data.volume_dataset import CacheVolumeDataset
from tests.data.conftest import CacheBuilder, noise_volume

#: a CT window mapping -1000 HU to 0 and +1000 HU to 1
WIDE = [(0.0, 2000.0)]


def marker_volume(shape=(40, 60, 80), at=(20, 30, 40)) -> np.ndarray:
    vol = np.full(shape, -1000, np.int16)
    vol[at] = 1000
    return vol


def dataset(cache_dir, options: VolumeOptions, random_crop: bool, **rule) -> CacheVolumeDataset:
    rows = select_volumes(load_manifest(cache_dir).rows, split="train", options=options).rows
    transform = VolumeTransform(options, IntensityRule.checked(ct_windows=WIDE, **rule))
    return CacheVolumeDataset(cache_dir, VolumeIndex(rows, options), transform, random_crop=random_crop)


def test_centred_crop_puts_a_marker_at_its_millimetre_position(cache_builder: CacheBuilder) -> None:
    # spacing (2, 1, 0.5) mm: the marker voxel (20, 30, 40) is centred at (41, 30.5, 20.25) mm from the corner
    cache_builder.add("a", marker_volume(), spacing=(2.0, 1.0, 0.5))
    ds = dataset(cache_builder.write(), VolumeOptions(size=(16, 16, 16), spacing_mm=1.0), random_crop=False)
    image = ds[0]["image"]
    assert image.shape == (1, 16, 16, 16) and image.dtype == torch.float32
    # the centred 16 mm box starts at (80-16)/2 = 32 mm, (60-16)/2 = 22 mm, (40-16)/2 = 12 mm
    z, y, x = (41 - 32, 30.5 - 22, 20.25 - 12)  # marker centre in output mm = output voxel coordinates + 0.5
    peak = image[0].nonzero().float()
    centre = (peak * image[0][tuple(peak.long().T)][:, None]).sum(0) / image[0].sum()
    assert torch.allclose(centre + 0.5, torch.tensor([z, y, x]), atol=0.3)
    assert float(image.max()) == pytest.approx(0.375)  # 1 x (1/2 along Z at 2 mm) ... trilinear weights
    assert float(image.min()) == 0.0


def test_random_crops_follow_their_plan_and_spacing(cache_builder: CacheBuilder) -> None:
    """Every random crop maps the marker where its own plan says (scale, aspect, position, flips)."""
    vol = np.full((30, 40, 50), -1000, np.int16)
    vol[13:18, 18:23, 23:28] = 1000  # a 5-voxel cube centred on voxel (15, 20, 25): 10 x 7.5 x 5 mm
    cache_builder.add("a", vol, spacing=(2.0, 1.5, 1.0))
    options = VolumeOptions(size=(12, 12, 12), spacing_mm=2.0, crop_scale=(0.6, 1.4), flip_prob=(0.5, 0.5, 0.5))
    ds = dataset(cache_builder.write(), options, random_crop=True)
    record = ds.index.rows[0]
    checked = 0
    for draw in range(100):
        key = (0, draw, 0)
        rng, *_ = ds._resolve(key)
        crop = plan_crop(rng, record.shape, record.spacing, options)
        image = ds[key]["image"]
        # expected output coordinate of the marker centre (edge coordinate 15.5 / 20.5 / 25.5)
        expected = []
        for axis, c in enumerate((15.5, 20.5, 25.5)):
            u = (c - crop.start[axis]) / crop.extent[axis] * 12
            expected.append(12 - u if crop.flips[axis] else u)
        if not all(3.0 <= e <= 9.0 for e in expected):
            continue  # the cube is outside or cut by this crop's border
        checked += 1
        weights = image[0]
        grid = torch.meshgrid(*(torch.arange(12.0) + 0.5 for _ in range(3)), indexing="ij")
        centroid = [float((g * weights).sum() / weights.sum()) for g in grid]
        assert centroid == pytest.approx(expected, abs=0.35)
    assert checked >= 5


def test_a_crop_larger_than_the_series_pads_with_zero(cache_builder: CacheBuilder) -> None:
    vol = np.full((11, 11, 11), 1000, np.int16)
    cache_builder.add("small", vol, spacing=(1.0, 1.0, 1.0))
    options = VolumeOptions(size=8, spacing_mm=2.0, min_coverage=0.5)  # 16 mm field of view over an 11 mm cube
    image = dataset(cache_builder.write(), options, random_crop=False)[0]["image"][0]
    assert float(image[4, 4, 4]) == 1.0
    assert float(image[0, 0, 0]) == 0.0 and float(image[7, 7, 7]) == 0.0
    # output voxel centres at -2, 0, 2, ..., 12 (source voxel coordinates): 0..10 lie on the series
    assert int((image > 0.5).sum()) == 6 * 6 * 6 and int((image > 0).sum()) == 6 * 6 * 6


def test_selection_counts_each_reason() -> None:
    from tests.data.conftest import make_record

    options = VolumeOptions(size=32, spacing_mm=2.0, min_coverage=0.5, max_anisotropy=4.0)
    rows = [
        make_record("ok", np.zeros((40, 40, 40), np.int16), spacing=(1.0, 1.0, 1.0)),
        make_record("thick", np.zeros((20, 200, 200), np.int16), spacing=(5.0, 0.7, 0.7)),  # 7.1 > 4
        make_record("thin", np.zeros((5, 64, 64), np.int16), spacing=(1.0, 1.0, 1.0)),  # 5 mm < 32 mm
        make_record("xr", np.zeros((1, 64, 64), np.int16), kind="image"),
        make_record("mr", np.zeros((40, 40, 40), np.int16), modality="MR"),
        make_record("val", np.zeros((40, 40, 40), np.int16), split="val"),
    ]
    sel = select_volumes(rows, split="train", options=options, modalities=["CT"])
    assert [r.series_id for r in sel.rows] == ["ok"]
    assert dict(sel.dropped) == {"volume_anisotropy": 1, "volume_coverage": 1, "image": 1, "modality": 1}


@pytest.mark.parametrize(
    ("field", "kwargs"),
    [
        ("spacing_mm", {"spacing_mm": 0.0}),
        ("spacing_mm", {"spacing_mm": (1.0, -1.0, 1.0)}),
        ("size", {"size": (32, 32)}),
        ("size", {"size": 0}),
        ("crop_scale", {"crop_scale": (0.0, 1.0)}),
        ("crop_aspect", {"crop_aspect": (1.2, 1.5)}),
        ("flip_prob", {"flip_prob": 1.5}),
        ("min_coverage", {"min_coverage": 0.0}),
        ("max_anisotropy", {"max_anisotropy": 0.5}),
    ],
)
def test_bad_volume_options_name_their_field(field: str, kwargs: dict) -> None:
    with pytest.raises(ValueError, match=f"data.volume.{field}"):
        VolumeOptions(**kwargs)


def test_reads_only_the_crop_box(cache_builder: CacheBuilder, monkeypatch: pytest.MonkeyPatch) -> None:
    cache_builder.add("big", noise_volume(0, (80, 128, 128)), spacing=(1.0, 1.0, 1.0))
    ds = dataset(cache_builder.write(), VolumeOptions(size=16, spacing_mm=1.0, crop_scale=(0.5, 1.5)), True)
    boxes: list[tuple[int, ...]] = []
    original = SeriesReader.read_box

    def spy(self: SeriesReader, series: int, box):  # noqa: ANN001
        out = original(self, series, box)
        boxes.append(out.shape)
        return out

    monkeypatch.setattr(SeriesReader, "read_box", spy)
    for draw in range(10):
        ds[(0, draw, 0)]
    assert len(boxes) == 10
    # at most (1.5^(1/3) x 1.25 x 16 + 2) voxels per axis: never the 80 x 128 x 128 volume
    assert all(max(shape) <= 26 for shape in boxes)


def test_foreground_retries_stay_in_the_series(cache_builder: CacheBuilder) -> None:
    vol = np.full((60, 60, 60), -1000, np.int16)
    vol[40:56, 4:20, 4:20] = 50  # a small body in one corner of a box of air
    cache_builder.add("air", vol, spacing=(1.0, 1.0, 1.0))
    options = VolumeOptions(size=12, spacing_mm=1.0, crop_scale=(1.0, 1.0), crop_aspect=(1.0, 1.0))
    ds = dataset(cache_builder.write(), options, True, foreground_fraction=0.3)
    ds.foreground_tries = 200
    samples = [ds[(0, d, 0)] for d in range(5)]
    assert sum(s["rejected"] for s in samples) > 0
    for s in samples:
        # tested on the read box (the crop plus the interpolation's one-voxel margin)
        assert s["series"] == 0 and float((s["image"] > 0.4).float().mean()) >= 0.2


def test_resample_and_restore_keep_geometry() -> None:
    z, y, x = np.meshgrid(np.arange(20), np.arange(30), np.arange(16), indexing="ij")
    ramp = torch.from_numpy((2.0 * z + 0.5 * y - x).astype(np.float32))[None]
    spacing, target = (2.0, 1.0, 1.5), (1.0, 1.5, 3.0)
    resampled = resample_volume(ramp, spacing, target)
    assert tuple(resampled.shape[1:]) == (40, 20, 8)
    # a linear ramp stays the same function of millimetres, inside the volume
    back = restore_volume(resampled, ramp.shape[1:], spacing, target)
    assert back.shape == ramp.shape
    assert torch.allclose(back[0, 2:-2, 2:-2, 2:-2], ramp[0, 2:-2, 2:-2, 2:-2], atol=1e-3)


def test_crop_read_box_covers_the_interpolation_support() -> None:
    crop = VolumeCrop(start=(2.3, -4.0, 5.0), extent=(10.0, 30.0, 3.0), flips=(False, False, False))
    assert crop.read_box((40, 20, 8)) == ((1, 13), (0, 20), (4, 8))


def test_datamodule_yields_3d_batches_and_records_them(cache_builder: CacheBuilder) -> None:
    for i in range(3):
        cache_builder.add(f"ct{i}", noise_volume(i, (30, 48, 48)), spacing=(2.0, 1.0, 1.0))
    cache_builder.add("v0", noise_volume(9, (30, 48, 48)), spacing=(2.0, 1.0, 1.0), split="val")
    cache_builder.add("xr", noise_volume(5, (1, 48, 48)), modality="DX", kind="image")
    cache = cache_builder.write()
    options = VolumeOptions(size=16, spacing_mm=2.0)
    channels = IntensityOptions(ct_window_mode="channels")
    dm = CacheDataModule(str(cache), batch_size=2, num_workers=0, volume=options, intensity=channels)
    dm.setup("fit")
    assert dm.spatial_dims == 3 and dm.image_size == (16, 16, 16) and dm.channels == 3
    assert dm.setup_report["train"]["dropped"] == {"image": 1}
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (2, 3, 16, 16, 16)
    assert batch["image"].min() >= 0 and batch["image"].max() <= 1
    again = CacheDataModule(str(cache), batch_size=2, num_workers=0, volume=options, intensity=channels)
    assert torch.equal(next(iter(again.train_dataloader()))["image"], batch["image"])  # a pure function of keys
    record = dm.preprocessing()
    assert record["spatial_dims"] == 3 and record["volume"]["size"] == [16, 16, 16]
    assert record["volume"]["spacing_mm"] == [2.0, 2.0, 2.0] and record["channels"] == 3
    assert record["training_data"]["series"] == 3
    text = json.dumps(record)
    assert "ct0" not in text and str(cache) not in text and "p-ct0" not in text


def test_datamodule_rejects_2d_options_with_volume(tmp_path) -> None:
    with pytest.raises(ValueError, match="data.slices"):
        CacheDataModule(str(tmp_path), slices=3, volume=VolumeOptions())
    with pytest.raises(ValueError, match="data.loader.device_transforms"):
        CacheDataModule(str(tmp_path), loader=LoaderOptions(device_transforms=True), volume=VolumeOptions())


def test_no_usable_volume_names_the_fields(cache_builder: CacheBuilder) -> None:
    cache_builder.add("thick", noise_volume(0, (10, 64, 64)), spacing=(5.0, 0.7, 0.7))
    cache_builder.add("xr", noise_volume(5, (1, 48, 48)), modality="DX", kind="image")
    dm = CacheDataModule(str(cache_builder.write()), num_workers=0, volume=VolumeOptions(size=16, spacing_mm=2.0))
    with pytest.raises(RuntimeError, match="no usable training volume.*data.volume.max_anisotropy"):
        dm.setup("fit")
