"""Crop geometry, resize and intensity policies (MONAI serves as the reference where it has the op)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from monai.transforms import Resize, ScaleIntensityRange

from medmae.data.intensity import IntensityRule
from medmae.data.transforms import (
    SliceTransform,
    center_crop_box,
    foreground_fraction,
    random_resized_crop_box,
    resize,
    scale_intensity,
)
from tests.data.conftest import make_record


def _boxes(n: int, plane: tuple[int, int], out_aspect: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    boxes = [random_resized_crop_box(rng, plane, (0.2, 1.0), (3 / 4, 4 / 3), out_aspect) for _ in range(n)]
    return np.array([(b.top, b.left, b.height, b.width) for b in boxes], dtype=np.float64)


def test_random_resized_crop_scale_and_aspect_distribution() -> None:
    plane = (512, 512)
    b = _boxes(20_000, plane, 1.0)
    top, left, h, w = b.T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 512).all() and (left + w <= 512).all()
    scale = h * w / (512 * 512)
    log_ratio = np.log(w / h)
    assert scale.min() >= 0.2 * 0.99 and scale.max() <= 1.0
    assert np.abs(log_ratio).max() <= math.log(4 / 3) + 0.01
    assert scale.min() < 0.21 and scale.max() > 0.97  # the whole range is used
    # Below scale 0.75 every aspect fits the plane, so (scale, log-ratio) is uniform there.
    low = scale <= 0.75
    assert low.mean() > 0.6
    assert scale[low].mean() == pytest.approx((0.2 + 0.75) / 2, abs=0.01)
    np.testing.assert_allclose(np.quantile(scale[low], [0.25, 0.75]), [0.3375, 0.6125], atol=0.012)
    half_range = math.log(4 / 3)
    assert log_ratio[low].mean() == pytest.approx(0.0, abs=0.01)
    np.testing.assert_allclose(np.quantile(log_ratio[low], [0.25, 0.75]), [-half_range / 2, half_range / 2], atol=0.01)
    # and the box position is uniform: centres spread evenly left/right of the middle
    centre_x = (left + w / 2)[low] / 512
    assert centre_x.mean() == pytest.approx(0.5, abs=0.01)


def test_random_resized_crop_ratio_is_relative_to_a_non_square_output() -> None:
    b = _boxes(5_000, (512, 512), out_aspect=2.0, seed=1)
    relative = (b[:, 3] / b[:, 2]) / 2.0
    assert relative.min() >= 3 / 4 * 0.98 and relative.max() <= 4 / 3 * 1.02
    assert relative.min() < 0.8 and relative.max() > 1.25


def test_center_crop_box_has_the_output_aspect() -> None:
    box = center_crop_box((300, 200), out_aspect=1.0)
    assert (box.top, box.left, box.height, box.width) == (50, 0, 200, 200)
    box = center_crop_box((100, 400), out_aspect=2.0)
    assert (box.top, box.left, box.height, box.width) == (0, 100, 100, 200)


def test_resize_and_scaling_match_monai_without_antialias() -> None:
    x = torch.from_numpy(np.random.default_rng(0).normal(0, 300, (2, 100, 130)).astype(np.float32))
    ours = resize(x, (56, 64), mode="bilinear", antialias=False)
    ref = Resize((56, 64), mode="bilinear", align_corners=False)(x)
    torch.testing.assert_close(ours, torch.as_tensor(ref), atol=1e-4, rtol=1e-5)
    scaled = scale_intensity(ours, -160.0, 240.0)
    ref_scaled = ScaleIntensityRange(-160.0, 240.0, 0.0, 1.0, clip=True)(ref)
    torch.testing.assert_close(scaled, torch.as_tensor(ref_scaled), atol=1e-5, rtol=1e-5)


def test_antialiased_downscale_removes_a_checkerboard() -> None:
    checker = torch.from_numpy((np.indices((224, 224)).sum(0) % 2).astype(np.float32))[None] * 1000
    smooth = resize(checker, (56, 56), mode="bicubic", antialias=True)
    assert smooth.std() < 0.05 * checker.std()  # a 4x downscale of a 1-pixel checkerboard is flat grey


@pytest.mark.parametrize(
    ("hu", "expected"), [(-1000, 0.0), (-160, 0.0), (-60, 0.25), (40, 0.5), (240, 1.0), (1500, 1.0)]
)
def test_ct_window_maps_known_hu(hu: int, expected: float) -> None:
    t = SliceTransform((16, 16), intensity=IntensityRule.checked(ct_windows=[(40, 400)]))
    slab = np.full((1, 32, 32), hu, dtype=np.int16)
    record = make_record("ct", slab)
    out = t(slab, record, np.random.default_rng(0))
    assert out.shape == (1, 16, 16) and out.dtype == torch.float32
    torch.testing.assert_close(out, torch.full_like(out, expected), atol=1e-6, rtol=0)


def test_ct_windows_as_channels_are_window_major() -> None:
    rule = IntensityRule.checked(ct_windows=[(40, 400), (-600, 1500)], ct_window_mode="channels")
    t = SliceTransform((8, 8), slices=2, intensity=rule)
    assert t.channels == 4
    slab = np.stack([np.full((8, 8), -600, np.int16), np.full((8, 8), 40, np.int16)])
    out = t(slab, make_record("ct", slab), np.random.default_rng(0))
    # soft tissue window [-160, 240]: -600 -> 0, 40 -> 0.5 ; lung [-1350, 150]: -600 -> 0.5, 40 -> 1390/1500
    np.testing.assert_allclose(out.mean(dim=(1, 2)).numpy(), [0.0, 0.5, 0.5, 1390 / 1500], atol=1e-6)


def test_random_window_picks_each_listed_window() -> None:
    rule = IntensityRule.checked(ct_windows=[(40, 400), (-600, 1500)], ct_window_mode="random")
    t = SliceTransform((8, 8), intensity=rule)
    slab = np.full((1, 8, 8), 40, np.int16)
    record = make_record("ct", slab)
    values = {round(float(t(slab, record, np.random.default_rng(i)).mean()), 4) for i in range(40)}
    assert values == {0.5, round(1390 / 1500, 4)}


def test_non_ct_uses_stored_percentiles() -> None:
    volume = np.arange(4000, dtype=np.int16).reshape(2, 40, 50)
    record = make_record("mr", volume, modality="MR")
    t = SliceTransform((8, 8), intensity=IntensityRule.checked(percentiles=(5.0, 95.0)))
    lo, hi = record.stats["p5"], record.stats["p95"]
    slab = np.full((1, 16, 16), int((lo + hi) / 2), np.int16)
    out = t(slab, record, np.random.default_rng(0))
    expected = (int((lo + hi) / 2) - lo) / (hi - lo)
    torch.testing.assert_close(out, torch.full_like(out, expected), atol=1e-5, rtol=0)


def test_foreground_filter_rejects_an_all_air_slice() -> None:
    t = SliceTransform((16, 16), intensity=IntensityRule.checked(foreground_fraction=0.2))
    air = np.full((1, 64, 64), -1000, np.int16)
    body = air.copy()
    body[0, 16:48, 16:48] = 40  # a quarter of the plane is soft tissue
    record = make_record("ct", body)
    assert foreground_fraction(air[0], -500) == 0.0
    assert foreground_fraction(body[0], -500) == pytest.approx(0.25, abs=0.02)
    assert not t.is_foreground(air, record)
    assert t.is_foreground(body, record)
    assert SliceTransform((16, 16)).is_foreground(air, record)  # filter off by default


def test_slice_indices_are_clamped_at_the_edges() -> None:
    t = SliceTransform((8, 8), slices=3)
    assert t.pick_planes(0, 10).indices.tolist() == [0, 0, 1]
    assert t.pick_planes(9, 10).indices.tolist() == [8, 9, 9]
    assert SliceTransform((8, 8), slices=4).pick_planes(5, 10).indices.tolist() == [4, 5, 6, 7]
    assert t.pick_planes(0, 1).indices.tolist() == [0, 0, 0]


def test_slice_spacing_places_planes_in_millimetres() -> None:
    t = SliceTransform((8, 8), slices=3, slice_spacing_mm=2.5)
    assert t.pick_planes(32, 65, axis_spacing=0.625).indices.tolist() == [28, 32, 36]
    assert t.describe()["slice_spacing_mm"] == 2.5 and t.describe()["slice_offsets_mm"] == [-2.5, 0.0, 2.5]


@pytest.mark.parametrize(
    ("field", "kwargs"),
    [
        ("slice_spacing_mm", {"slices": 3, "slice_spacing_mm": -2.5}),
        ("slice_interpolation", {"slices": 3, "slice_spacing_mm": 2.5, "slice_interpolation": "cubic"}),
        ("ct_inference_window", {"ct_inference_window": 3}),
        ("ct_inference_window", {"ct_windows": [(40, 400)], "ct_inference_window": 1}),
        ("ct_inference_window", {"ct_inference_window": True}),
    ],
)
def test_new_options_are_validated_and_named(field: str, kwargs: dict) -> None:
    slice_keys = {"slices", "slice_spacing_mm", "slice_interpolation"}
    rule = {k: v for k, v in kwargs.items() if k not in slice_keys}
    with pytest.raises(ValueError, match=field):
        SliceTransform(
            (8, 8),
            **{k: v for k, v in kwargs.items() if k in slice_keys},
            intensity=IntensityRule.checked(**rule),
        )


def test_record_states_the_inference_window_and_the_percentile_rule() -> None:
    record = SliceTransform((8, 8), intensity=IntensityRule.checked(ct_inference_window=2)).describe()
    assert record["intensity"]["ct"]["inference_window"] == 2
    rule = record["intensity"]["other"]["percentile_rule"]
    assert "whole series" in rule["voxels"] and "background" in rule["voxels"]
    assert "modality LUT" in rule["values"] and "MONOCHROME1" in rule["values"] and "no VOI LUT" in rule["values"]


def test_percentile_rule_is_what_the_cache_stores() -> None:
    """The card says: every stored voxel of the whole series, background included (compute_stats)."""
    volume = np.zeros((4, 32, 32), np.int16)
    volume[1:3, 8:24, 8:24] = np.arange(512, dtype=np.int16).reshape(2, 16, 16) + 100  # body in air
    record = make_record("mr", volume, modality="MR")
    for p in (0.5, 99.5):
        assert record.stats[f"p{p:g}"] == pytest.approx(np.percentile(volume, p, method="linear"))
    assert record.stats["p0.5"] == 0.0 != np.percentile(volume[volume > 0], 0.5)  # background counts
