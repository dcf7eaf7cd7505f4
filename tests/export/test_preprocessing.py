"""preprocessing_from_card: 2.5D neighbours, axes, pad/restore, CT windows — from the card alone."""

import numpy as np
import pytest
import torch

from medmae.data import CacheDataModule
from medmae.export import CardError, preprocessing_from_card


def card_for(tmp_path, **data_kwargs) -> dict:
    return {"preprocessing": CacheDataModule(str(tmp_path / "cache"), **data_kwargs).preprocessing()}


def test_two_and_a_half_d_channels_are_the_neighbouring_planes_clamped_at_the_ends(tmp_path) -> None:
    pre = preprocessing_from_card(card_for(tmp_path, img_size=8, slices=3))
    volume = np.stack([np.full((8, 8), z, np.int16) for z in range(5)])  # plane z holds the value z
    stats = {"min": 0.0, "p0.5": 0.0, "p99.5": 4.0}
    x = pre.planes(volume, "raw", stats, indices=[0, 2, 4])
    assert x.shape == (3, 3, 8, 8)
    centre_values = x[:, :, 4, 4] * 4.0  # back to the stored values
    torch.testing.assert_close(centre_values, torch.tensor([[0.0, 0, 1], [1, 2, 3], [3, 4, 4]]))


def test_coronal_planes_pad_to_square_and_restore_exactly(tmp_path) -> None:
    pre = preprocessing_from_card(card_for(tmp_path, img_size=16, axis="coronal"))
    volume = np.random.default_rng(0).integers(0, 100, size=(6, 10, 12)).astype(np.int16)  # (Z, Y, X)
    stack = pre.stack(volume)
    assert stack.shape == (10, 6, 12)  # coronal planes: Y slices of (Z reversed, X)
    np.testing.assert_array_equal(stack[3], volume[::-1, 3, :])
    box = pre.pad_box(stack.shape[1:])
    assert box.padded == (12, 12) and box.top == 3

    # a label map: pad + nearest resize -> one-hot "logits" -> restore -> argmax gives every pixel back
    labels = np.random.default_rng(1).integers(0, 4, size=(6, 10, 12)).astype(np.uint8)
    on_grid = pre.labels(labels, indices=[3])
    assert on_grid.shape == (1, 16, 16)
    assert not on_grid[0, :4].any() and not on_grid[0, 12:].any()  # 3 of 12 padded rows = 4 of 16: background
    onehot = torch.nn.functional.one_hot(on_grid, 4).permute(0, 3, 1, 2).float()
    back = pre.restore(onehot, stack.shape[1:])
    assert back.shape == (1, 4, 6, 12)
    np.testing.assert_array_equal(back.argmax(1)[0].numpy(), pre.stack(labels)[3])

    # image values: a linear field survives planes -> restore (bilinear both ways) exactly inside the plane;
    # the first and last columns see the resampler's edge clamping, the first and last rows the padding fill
    z, y, x = np.meshgrid(np.arange(6), np.arange(10), np.arange(12), indexing="ij")
    ramp = (100 + 10 * z + y + 3 * x).astype(np.int16)
    stats = {"min": 0.0, "p0.5": 0.0, "p99.5": 200.0}  # stored value v -> v / 200, never clamped
    restored = pre.restore(pre.planes(ramp, "raw", stats, indices=[3]), stack.shape[1:])[0, 0].numpy() * 200.0
    plane = pre.stack(ramp)[3].astype(np.float32)
    np.testing.assert_allclose(restored[1:-1, 1:-1], plane[1:-1, 1:-1], atol=1e-3, rtol=0)
    np.testing.assert_allclose(restored[1:-1], plane[1:-1], atol=0.5, rtol=0)


def test_ct_uses_the_first_window_at_inference_and_all_in_channel_mode(tmp_path) -> None:
    hu = np.full((1, 4, 4), 40, np.int16)  # soft-tissue window centre
    stats = {"min": 40.0}
    pre = preprocessing_from_card(card_for(tmp_path, img_size=4))
    assert float(pre.planes(hu, "HU", stats)[0, 0, 0, 0]) == pytest.approx(0.5)
    chans = preprocessing_from_card(card_for(tmp_path, img_size=4, ct_window_mode="channels"))
    assert chans.channels == 3 and pre.planes(hu, "HU", stats).shape[1] == 1
    assert chans.planes(hu, "HU", stats).shape == (1, 3, 4, 4)


@pytest.mark.parametrize("field", ["axis", "image_size", "slice_offsets"])
def test_missing_fields_are_named(tmp_path, field: str) -> None:
    card = card_for(tmp_path, img_size=8)
    del card["preprocessing"][field]
    with pytest.raises(CardError, match=f"enc/encoder.json: field 'preprocessing.{field}'"):
        preprocessing_from_card(card, where="enc/encoder.json")


def test_ct_inference_window_is_written_and_used(tmp_path) -> None:
    hu = np.full((1, 4, 4), -600, np.int16)  # lung window centre
    stats = {"min": -600.0}
    card = card_for(tmp_path, img_size=4, ct_inference_window=1)
    assert card["preprocessing"]["intensity"]["ct"]["inference_window"] == 1
    assert float(preprocessing_from_card(card).planes(hu, "HU", stats)[0, 0, 0, 0]) == pytest.approx(0.5)
    del card["preprocessing"]["intensity"]["ct"]["inference_window"]  # cards from before the option
    assert preprocessing_from_card(card).inference_window == 0
    card["preprocessing"]["intensity"]["ct"]["inference_window"] = 3
    with pytest.raises(CardError, match="field 'preprocessing.intensity.ct.inference_window'"):
        preprocessing_from_card(card)


def test_card_states_the_percentile_rule_in_full(tmp_path) -> None:
    other = card_for(tmp_path)["preprocessing"]["intensity"]["other"]
    assert other["percentiles"] == [0.5, 99.5]
    rule = other["percentile_rule"]
    assert set(rule) >= {"voxels", "values", "method"}
    assert "every stored voxel of the whole series" in rule["voxels"]
    assert "no VOI LUT" in rule["values"] and "MONOCHROME1" in rule["values"]
