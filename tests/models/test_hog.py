"""The HOG target (MaskFeat) and the MAE's HOG head beside the pixels."""

import math

import pytest
import torch

from medmae.models import create_mae
from medmae.models.flops import model_train_flops
from medmae.models.hog import HOGTarget
from medmae.models.options import MAEOptions
from medmae.models.patches import patchify
from medmae.models.variants import build_mae

SMALL = {"depth": 2, "decoder_embed_dim": 64, "decoder_depth": 1, "decoder_num_heads": 4}


def _bins(hog: torch.Tensor, target: HOGTarget) -> torch.Tensor:
    """(B, N, dim) -> (B, N, cells, bins): the descriptor's layout is channel, bin, cell row, cell column."""
    b, n, _ = hog.shape
    cells = target.cells_per_side**2
    return hog.reshape(b, n, target.channels, target.bins, cells)[:, :, 0].transpose(2, 3)


def test_a_vertical_edge_votes_in_the_zero_degree_bin_of_the_patch_that_holds_it() -> None:
    target = HOGTarget(channels=1, patch_size=16)
    x = torch.zeros(1, 1, 32, 48)
    x[..., 36:] = 1.0  # one step along x, inside the third patch column (x 32..47) of both patch rows
    hog = target(x)
    assert hog.shape == (1, 6, 1 * 9 * 4)
    nonzero = hog.abs().sum(-1) > 0
    assert nonzero.tolist() == [[False, False, True, False, False, True]]  # patchify's row-major order
    for patch in (2, 5):
        votes = _bins(hog, target)[0, patch]  # (cells, bins)
        assert torch.all(votes[:, 1:] == 0) and votes[:, 0].sum() > 0  # gradient along +x: angle 0
        assert float(hog[0, patch].norm()) == pytest.approx(math.sqrt(target.dim), rel=1e-5)


def test_a_horizontal_edge_splits_its_vote_between_the_two_bins_around_ninety_degrees() -> None:
    target = HOGTarget(channels=1, patch_size=16)
    x = torch.zeros(1, 1, 16, 16)
    x[..., 5:, :] = 1.0  # gradient along +y: angle pi / 2, bin position 4.5
    votes = _bins(target(x), target)[0, 0].sum(0)
    assert torch.allclose(votes[4], votes[5]) and votes[4] > 0
    assert torch.all(votes[[0, 1, 2, 3, 6, 7, 8]] == 0)


def test_the_target_ignores_brightness_and_contrast_but_not_shape() -> None:
    target = HOGTarget(channels=2, patch_size=16)
    x = torch.rand(2, 2, 32, 32)
    torch.testing.assert_close(target(3.0 * x + 5.0), target(x), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(target(x.transpose(-1, -2)), target(x), atol=1e-2)


def test_patch_sizes_that_cells_do_not_tile_are_refused() -> None:
    with pytest.raises(ValueError, match="multiple of 8"):
        HOGTarget(channels=1, patch_size=12)


def test_the_hog_head_adds_its_weighted_error_to_the_pixel_loss_and_trains() -> None:
    x = torch.rand(2, 1, 32, 48)
    torch.manual_seed(0)
    pixels_only = create_mae("mae_vit_tiny_patch16", img_size=(32, 48), **SMALL)
    torch.manual_seed(0)
    both = create_mae("mae_vit_tiny_patch16", img_size=(32, 48), hog_weight=0.5, **SMALL)
    assert not hasattr(pixels_only, "decoder_pred_hog") and both.decoder_pred_hog.out_features == 36
    g = torch.Generator().manual_seed(1)
    out = both(x, generator=g)
    g = torch.Generator().manual_seed(1)
    latent, mask, ids = both.forward_encoder(x, both.mask_ratio, g)
    features = both.decoder_features(latent, ids)
    expected = both.forward_loss(x, both.decoder_pred(features), mask) + 0.5 * both.hog_loss(x, features, mask)
    torch.testing.assert_close(out.loss, expected)
    assert out.pred.shape == (2, 6, 256)  # the pixel prediction is what it was: images and export unchanged
    hog_error = ((both.decoder_pred_hog(features) - both.hog(x)).pow(2).mean(-1) * out.mask).sum() / out.mask.sum()
    assert float(hog_error.detach()) > 0
    out.loss.backward()
    assert both.decoder_pred_hog.weight.grad is not None and both.decoder_pred_hog.weight.grad.abs().sum() > 0
    assert set(pixels_only.state_dict()) < set(both.state_dict())
    assert patchify(x, 16).shape[1] == both.hog(x).shape[1]
    assert model_train_flops(both) > model_train_flops(pixels_only)  # the head is counted in the MFU


def test_hog_weight_is_checked_and_2d_only() -> None:
    with pytest.raises(ValueError, match="model.mae.hog_weight must be a number"):
        MAEOptions(hog_weight=-1.0)
    with pytest.raises(ValueError, match="model.mae.hog_weight is 2D only"):
        build_mae("mae3d_vit_tiny_patch16", MAEOptions(img_size=32, hog_weight=1.0, **SMALL))
