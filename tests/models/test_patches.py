import pytest
import torch

from medmae.models import grid_shape, patchify, sincos_pos_embed_2d, unpatchify


@pytest.mark.parametrize("channels", [1, 3, 5])
@pytest.mark.parametrize("size", [(32, 32), (32, 48), (64, 16)])
def test_patchify_round_trip(channels: int, size: tuple[int, int]) -> None:
    imgs = torch.randn(2, channels, *size)
    patches = patchify(imgs, 8)
    assert patches.shape == (2, (size[0] // 8) * (size[1] // 8), 8 * 8 * channels)
    assert torch.equal(unpatchify(patches, 8, grid_shape(size, 8), channels), imgs)


def test_patch_layout_is_row_major_grid_then_pixels_then_channels() -> None:
    imgs = torch.arange(2 * 4 * 6, dtype=torch.float32).reshape(1, 2, 4, 6)
    patches = patchify(imgs, 2)
    # second patch of the first grid row covers columns 2..3 of rows 0..1; vector layout (p, p, C)
    expected = torch.tensor([[2.0, 26.0], [3.0, 27.0], [8.0, 32.0], [9.0, 33.0]]).reshape(-1)
    assert torch.equal(patches[0, 1], expected)


def test_size_not_multiple_of_patch_names_both() -> None:
    with pytest.raises(ValueError, match=r"img_size \(30, 32\).*patch_size 8"):
        patchify(torch.zeros(1, 1, 30, 32), 8)


def test_sincos_non_square_grid_is_distinct_per_position() -> None:
    emb = sincos_pos_embed_2d(64, (3, 5), cls_token=True)
    assert emb.shape == (1, 16, 64)
    assert torch.equal(emb[0, 0], torch.zeros(64))
    body = emb[0, 1:]
    assert torch.cdist(body, body).add(torch.eye(15) * 1e3).min() > 1e-3
    # first half encodes the column: tokens in the same column share it
    assert torch.equal(body[0, :32], body[5, :32]) and not torch.equal(body[0, 32:], body[5, 32:])
