"""The plane (2D / 2.5D) input transform: 2.5D neighbours, axes, pad/restore, CT windows, the input's kind.

Built from the pretraining datamodule's record (``CacheDataModule.preprocessing()``), which the export
card keeps verbatim (tests/data/test_transform_record.py checks that both give the same transform).
"""

import numpy as np
import pytest
import torch

from medmae.data import CacheDataModule, IntensityOptions
from medmae.data.plane_transform import PlanePreprocessor
from medmae.data.transform_record import build_transform


def transform_for(tmp_path, **data_kwargs) -> PlanePreprocessor:
    pre = build_transform(CacheDataModule(str(tmp_path / "cache"), **data_kwargs).preprocessing())
    assert isinstance(pre, PlanePreprocessor) and pre.kind == "volume"
    return pre


def test_two_and_a_half_d_channels_are_the_neighbouring_planes_clamped_at_the_ends(tmp_path) -> None:
    pre = transform_for(tmp_path, img_size=8, slices=3)
    volume = np.stack([np.full((8, 8), z, np.int16) for z in range(5)])  # plane z holds the value z
    stats = {"min": 0.0, "p0.5": 0.0, "p99.5": 4.0}
    x = pre.forward(volume, "raw", stats, indices=[0, 2, 4])
    assert x.shape == (3, 3, 8, 8)
    centre_values = x[:, :, 4, 4] * 4.0  # back to the stored values
    torch.testing.assert_close(centre_values, torch.tensor([[0.0, 0, 1], [1, 2, 3], [3, 4, 4]]))
    assert torch.equal(pre.planes(volume, "raw", stats, indices=[0, 2, 4]), x)  # the older name, the same method


def test_coronal_planes_pad_to_square_and_restore_exactly(tmp_path) -> None:
    pre = transform_for(tmp_path, img_size=16, axis="coronal")
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

    # image values: a linear field survives forward -> restore (bilinear both ways) exactly inside the plane;
    # the first and last columns see the resampler's edge clamping, the first and last rows the padding fill
    z, y, x = np.meshgrid(np.arange(6), np.arange(10), np.arange(12), indexing="ij")
    ramp = (100 + 10 * z + y + 3 * x).astype(np.int16)
    stats = {"min": 0.0, "p0.5": 0.0, "p99.5": 200.0}  # stored value v -> v / 200, never clamped
    restored = pre.restore(pre.forward(ramp, "raw", stats, indices=[3]), stack.shape[1:])[0, 0].numpy() * 200.0
    plane = pre.stack(ramp)[3].astype(np.float32)
    np.testing.assert_allclose(restored[1:-1, 1:-1], plane[1:-1, 1:-1], atol=1e-3, rtol=0)
    np.testing.assert_allclose(restored[1:-1], plane[1:-1], atol=0.5, rtol=0)


def test_ct_uses_the_first_window_at_inference_and_all_in_channel_mode(tmp_path) -> None:
    hu = np.full((1, 4, 4), 40, np.int16)  # soft-tissue window centre
    stats = {"min": 40.0}
    pre = transform_for(tmp_path, img_size=4)
    assert float(pre.forward(hu, "HU", stats)[0, 0, 0, 0]) == pytest.approx(0.5)
    chans = transform_for(tmp_path, img_size=4, intensity=IntensityOptions(ct_window_mode="channels"))
    assert chans.channels == 3 and pre.forward(hu, "HU", stats).shape[1] == 1
    assert chans.forward(hu, "HU", stats).shape == (1, 3, 4, 4)
    assert chans.intensity.groups == 3 and pre.intensity.ct_inference_window == 0  # pretraining's IntensityRule


@pytest.mark.parametrize("axis", ["axial", "coronal", "sagittal"])
def test_forward_labels_restore_round_trip_the_plane_shape_on_every_axis(tmp_path, axis: str) -> None:
    pre = transform_for(tmp_path, img_size=(16, 24), slices=3, axis=axis)
    volume = np.random.default_rng(2).integers(0, 100, size=(5, 7, 9)).astype(np.int16)
    stats = {"min": 0.0, "p0.5": 0.0, "p99.5": 100.0}
    stack = pre.stack(volume)
    x = pre.forward(volume, "raw", stats)
    assert x.shape == (stack.shape[0], 3, 16, 24) and x.dtype == torch.float32
    assert pre.labels(volume.astype(np.uint8)).shape == (stack.shape[0], 16, 24)
    assert pre.restore(x, stack.shape[1:]).shape == (stack.shape[0], 3, *stack.shape[1:])


@pytest.mark.parametrize("axis", ["coronal", "sagittal"])
def test_a_single_image_is_its_one_plane_under_a_coronal_or_sagittal_card(tmp_path, axis: str) -> None:
    """A CR / DX picture (kind ``image``, shape (1, Y, X)) carried by ``for_input``: one whole plane, as
    under an axial card and as pretraining read it; not Y (or X) one-row strips of a volume."""
    picture = ((np.mgrid[:40, :30][0] * 61 + np.mgrid[:40, :30][1] * 17) % 4096).astype(np.uint16)[None]
    labels = (picture > 2000).astype(np.uint8)
    stats = {"min": 0.0, "p0.5": 0.0, "p99.5": 4095.0}
    axial = transform_for(tmp_path, img_size=16, slices=3).for_input("image")
    pre = transform_for(tmp_path, img_size=16, slices=3, axis=axis)
    image = pre.for_input("image")
    assert image.kind == "image" and image.axis == axis and image.for_input("image") is image
    assert image.stack(picture).shape == (1, 40, 30)
    x = image.forward(picture, "raw", stats)
    assert x.shape == (1, 3, 16, 16)
    assert torch.equal(x, axial.forward(picture, "raw", stats))  # the same plane whatever the card's axis
    assert torch.equal(x[:, 0], x[:, 2])  # 2.5D channels repeat the one plane
    on_grid = image.labels(labels)
    assert torch.equal(on_grid, axial.labels(labels)) and on_grid.shape == (1, 16, 16)
    assert image.restore(x, image.stack(picture).shape[1:]).shape == (1, 3, 40, 30)
    # the failure the carried kind prevents: read as a volume, the picture is cut into one-row strips
    strips = pre.stack(picture)
    assert strips.shape[1] == 1 and strips.shape[0] == (40 if axis == "coronal" else 30)
    # the kind travels with the transform; an explicit argument still wins, and is checked
    assert torch.equal(pre.forward(picture, "raw", stats, kind="image"), x)
    with pytest.raises(ValueError, match="an image \\(kind 'image'\\) has one plane"):
        image.stack(np.zeros((3, 4, 4)))
    with pytest.raises(ValueError, match="kind must be one of"):
        pre.for_input("radiograph")


def test_the_kind_is_not_part_of_the_recorded_settings(tmp_path) -> None:
    pre = transform_for(tmp_path, img_size=8, slices=3)
    image = pre.for_input("image")
    assert image != pre and image.settings() == pre.settings()
    assert "kind" not in pre.settings() and PlanePreprocessor(**pre.settings()) == pre
