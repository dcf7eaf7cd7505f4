"""The volume (3D) input transform rebuilt from a 3D record: the pretraining transform's numbers,
millimetre geometry, labels on the same grid, and outputs restored onto the series' grid.

The record is ``VolumeTransform.describe()`` (the 3D datamodule's record holds it; the export card keeps
it verbatim: tests/data/test_transform_record.py checks that card and record give the same transform)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from medmae.data.cache import SeriesRecord, compute_stats
from medmae.data.intensity import IntensityRule
from medmae.data.plane_transform import PlanePreprocessor
from medmae.data.transform_record import build_transform
from medmae.data.volume import VolumeOptions, VolumeTransform, resample_labels
from medmae.data.volume_transform import VolumePreprocessor

pytestmark = pytest.mark.usefixtures("one_thread")


def record_of_transform(transform: VolumeTransform) -> dict[str, Any]:
    return transform.describe()


def record_of(volume: np.ndarray, spacing: tuple[float, float, float], intensity: str) -> SeriesRecord:
    return SeriesRecord(
        series_id="s", patient_id="p", modality="CT" if intensity == "HU" else "MR", source="nifti", kind="volume",
        array="s.npy", shape=volume.shape, spacing=spacing, dtype=str(volume.dtype), intensity=intensity,
        stats=compute_stats(volume), affine=tuple(tuple(float(i == j) for j in range(4)) for i in range(4)),
    )  # fmt: skip


@pytest.mark.parametrize(
    ("intensity", "rule"),
    [("HU", {"ct_windows": [(40, 400), (-600, 1500)], "ct_window_mode": "channels"}), ("raw", {})],
)
def test_whole_volume_equals_the_centred_validation_crop_where_they_overlap(intensity: str, rule: dict) -> None:
    """The record's transform gives pretraining's numbers (VolumeTransform's centred val crop) on shared voxels.

    Source spacing (2, 0.75, 0.75) mm to 1.5 mm: the centred crop of 8^3 starts 2, 1, 2 output voxels
    into the whole-volume grid (12, 10, 12)."""
    rng = np.random.default_rng(0)
    volume = rng.normal(0, 300, (9, 20, 24)).astype(np.int16)
    spacing = (2.0, 0.75, 0.75)
    transform = VolumeTransform(VolumeOptions(size=8, spacing_mm=1.5), IntensityRule.checked(**rule))
    record = record_of(volume, spacing, intensity)
    crop = transform.plan(np.random.default_rng(0), record, random_crop=False)
    box = crop.read_box(record.shape)
    values = volume[tuple(slice(lo, hi) for lo, hi in box)]
    expected = transform(values, box, crop, record, np.random.default_rng(0))

    pre = build_transform(record_of_transform(transform))
    assert isinstance(pre, VolumePreprocessor) and pre.size == (8, 8, 8) and pre.channels == transform.channels
    whole = pre.forward(volume, intensity, record.stats, spacing)
    assert torch.equal(pre.image(volume, intensity, record.stats, spacing), whole)  # the older name
    assert whole.shape == (transform.channels, 12, 10, 12)
    torch.testing.assert_close(whole[:, 2:10, 1:9, 2:10], expected, atol=1e-6, rtol=0)


def test_a_marker_lands_at_its_millimetre_position_in_image_and_labels() -> None:
    """A cube covering 10-14 mm on every axis at 0.5 mm lands on voxels 5 and 6 of a 2 mm grid (centres 11, 13 mm)."""
    volume = np.full((40, 40, 40), -1000, np.int16)
    volume[20:28, 20:28, 20:28] = 1000  # voxel i spans [0.5 i, 0.5 (i + 1)) mm
    labels = (volume > 0).astype(np.uint8)
    transform = VolumeTransform(VolumeOptions(size=16, spacing_mm=2.0), IntensityRule.checked(ct_windows=[(0, 2000)]))
    pre = build_transform(record_of_transform(transform))
    x = pre.forward(volume, "HU", compute_stats(volume), (0.5, 0.5, 0.5))[0]
    assert x.shape == (10, 10, 10)
    inside = torch.zeros_like(x, dtype=torch.bool)
    inside[5:7, 5:7, 5:7] = True
    assert torch.all(x[inside] == 1.0) and torch.all(x[~inside] == 0.0)
    grid_labels = pre.labels(labels, (0.5, 0.5, 0.5))
    assert grid_labels.dtype == torch.int64 and torch.equal(grid_labels.bool(), inside)


def test_restore_brings_outputs_back_onto_the_series_grid() -> None:
    z, y, x = np.meshgrid(np.arange(18), np.arange(30), np.arange(26), indexing="ij")
    smooth = (0.2 * z + 0.1 * y - 0.05 * x).astype(np.float32)
    spacing = (2.5, 0.8, 0.8)
    pre = VolumePreprocessor((16, 16, 16), (1.5, 1.5, 1.5), ((40.0, 400.0),), "random", 0, (0.5, 99.5))
    grid = resample_labels(np.zeros(smooth.shape), spacing, pre.spacing_mm)  # the grid shape (30, 16, 14)
    assert tuple(grid.shape) == (30, 16, 14)
    from medmae.data.volume import resample_volume

    down = resample_volume(torch.from_numpy(smooth)[None], spacing, pre.spacing_mm)
    back = pre.restore(down, smooth.shape, spacing)[0]
    assert back.shape == smooth.shape
    # a linear field is reproduced exactly away from the edges (where linear resampling clamps)
    torch.testing.assert_close(back[2:-2, 2:-2, 2:-2], torch.from_numpy(smooth)[2:-2, 2:-2, 2:-2], atol=1e-4, rtol=0)
    # class maps: label -> grid (nearest) -> one-hot logits -> restored argmax ~ the original label
    label = np.zeros(smooth.shape, np.uint8)
    label[4:14, 6:24, 5:20] = 1
    label[8:13, 10:20, 8:16] = 2
    on_grid = pre.labels(label, spacing)
    logits = torch.nn.functional.one_hot(on_grid, 3).permute(3, 0, 1, 2).float()
    restored = pre.restore_argmax(logits, label.shape, spacing)
    assert restored.dtype == torch.uint8 and torch.equal(
        restored, pre.restore(logits, label.shape, spacing).argmax(0).to(torch.uint8)
    )
    for k in (1, 2):
        p, t = restored.numpy() == k, label == k
        assert 2 * np.logical_and(p, t).sum() / (p.sum() + t.sum()) > 0.85


def test_inference_intensity_is_shared_with_2d() -> None:
    """Same intensity rule -> the documented ranges in both the 2D and the 3D preprocessor.

    Expectations from the rule itself, not from the code: a CT window (level, width) maps
    [level - width / 2, level + width / 2] to [0, 1]: (40, 400) -> [-160, 240], (-600, 1500) -> [-1350, 150];
    ``random`` mode uses window ``ct_inference_window`` (here 1), ``channels`` mode every window. Other
    series map the stored (0.5, 99.5) percentiles, here of 0..999 with linear interpolation:
    0.005 * 999 = 4.995 and 0.995 * 999 = 994.005, once per channel.
    """
    stats = compute_stats(np.arange(1000, dtype=np.float32).reshape(10, 10, 10))
    ct = {"channels": [(-160.0, 240.0), (-1350.0, 150.0)], "random": [(-1350.0, 150.0)]}
    for mode in ("random", "channels"):
        rule = IntensityRule.checked(ct_windows=[(40, 400), (-600, 1500)], ct_window_mode=mode, ct_inference_window=1)
        vol = build_transform(record_of_transform(VolumeTransform(VolumeOptions(size=16), rule)))
        assert isinstance(vol, VolumePreprocessor)
        plane = PlanePreprocessor(
            axis="axial",
            image_size=(16, 16),
            slice_offsets=(0,),
            interpolation="bilinear",
            antialias=True,
            ct_windows=((40.0, 400.0), (-600.0, 1500.0)),
            ct_window_mode=mode,
            inference_window=1,
            percentiles=(0.5, 99.5),
        )
        for pre in (vol, plane):
            assert pre.intensity_ranges("HU", stats) == ct[mode]
            raw = pre.intensity_ranges("raw", stats)
            assert len(raw) == len(ct[mode]) == pre.channels
            assert raw == [(pytest.approx(4.995, abs=1e-4), pytest.approx(994.005, abs=1e-4))] * pre.channels


def test_bad_spacing_is_named() -> None:
    pre = VolumePreprocessor((16, 16, 16), (1.5, 1.5, 1.5), ((40.0, 400.0),), "random", 0, (0.5, 99.5))
    with pytest.raises(ValueError, match="volume spacing must be finite and > 0"):
        pre.forward(np.zeros((4, 4, 4)), "HU", compute_stats(np.zeros((4, 4, 4))), (1.0, 0.0, 1.0))


def test_forward_restore_round_trip_the_series_shape_and_images_are_refused() -> None:
    pre = VolumePreprocessor((16, 16, 16), (1.5, 1.5, 1.5), ((40.0, 400.0),), "channels", 0, (0.5, 99.5))
    volume = np.random.default_rng(3).normal(0, 200, (7, 11, 13)).astype(np.int16)
    spacing = (3.0, 1.0, 1.0)
    x = pre.forward(volume, "HU", compute_stats(volume), spacing)
    assert x.shape == (1, 14, 7, 9) and pre.labels(volume > 0, spacing).shape == x.shape[1:]
    assert pre.restore(x, volume.shape, spacing).shape == (1, *volume.shape)
    assert pre.restore_argmax(torch.cat([x, 1 - x]), volume.shape, spacing).shape == volume.shape
    assert pre.for_input("volume") is pre and "kind" not in pre.settings()
    assert VolumePreprocessor(**pre.settings()) == pre and pre.input_size == pre.size
    with pytest.raises(ValueError, match="a single 2D image \\(kind image\\) cannot feed a 3D encoder"):
        pre.for_input("image")
