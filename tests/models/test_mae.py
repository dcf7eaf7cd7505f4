import pytest
import timm
import torch

from medmae.models import MAE_VARIANTS, MaskedAutoencoder, create_mae

SMALL_DECODER = {"decoder_embed_dim": 64, "decoder_depth": 2, "decoder_num_heads": 4}


def tiny(in_chans: int = 1, img_size: tuple[int, int] = (64, 48), **kw) -> MaskedAutoencoder:
    return create_mae("mae_vit_tiny_patch16", in_chans=in_chans, img_size=img_size, depth=2, **SMALL_DECODER, **kw)


@pytest.mark.parametrize(("in_chans", "img_size"), [(1, (64, 48)), (3, (32, 80))])
def test_encoder_is_plain_timm_vit_strict_load_and_equal_features(in_chans: int, img_size: tuple[int, int]) -> None:
    mae = tiny(in_chans, img_size).eval()
    vit = timm.create_model(
        "vit_tiny_patch16_224", in_chans=in_chans, num_classes=0, img_size=img_size, depth=2
    ).eval()
    vit.load_state_dict(mae.encoder.state_dict(), strict=True)
    x = torch.randn(3, in_chans, *img_size)
    latent, mask, _ = mae.forward_encoder(x, mask_ratio=0.0)
    assert mask.sum() == 0
    torch.testing.assert_close(latent, vit.forward_features(x), rtol=0, atol=1e-6)


def test_forward_shapes_and_every_parameter_gets_a_gradient() -> None:
    mae = tiny(in_chans=3)
    out = mae(torch.randn(2, 3, 64, 48))
    assert out.pred.shape == (2, 12, 16 * 16 * 3)
    assert out.mask.shape == (2, 12) and torch.equal(out.mask.sum(1), torch.tensor([9.0, 9.0]))
    out.loss.backward()
    missing = [n for n, p in mae.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []  # DDP can run without find_unused_parameters


@pytest.mark.parametrize("norm_pix", [True, False])
def test_loss_ignores_predictions_of_visible_patches(norm_pix: bool) -> None:
    mae = tiny(norm_pix_loss=norm_pix)
    x = torch.randn(2, 1, 64, 48)
    out = mae(x, generator=torch.Generator().manual_seed(0))
    pred = out.pred.detach().clone()
    base = mae.forward_loss(x, pred, out.mask)
    visible = out.mask == 0
    pred[visible] += 100.0
    assert torch.equal(mae.forward_loss(x, pred, out.mask), base)
    pred[~visible] += 1.0
    assert mae.forward_loss(x, pred, out.mask) != base


def test_norm_pix_target_is_normalised_per_patch() -> None:
    mae = tiny(norm_pix_loss=True)
    target = mae.target_patches(torch.rand(2, 1, 64, 48) * 1000 + 50)
    torch.testing.assert_close(target.mean(-1), torch.zeros(2, 12), atol=1e-4, rtol=0)
    torch.testing.assert_close(target.var(-1), torch.ones(2, 12), atol=1e-3, rtol=0)


def test_prediction_equal_to_target_gives_zero_loss_and_exact_pixels() -> None:
    mae = tiny(in_chans=3, norm_pix_loss=True)
    x = torch.rand(2, 3, 64, 48)
    mask = torch.ones(2, 12)
    assert mae.forward_loss(x, mae.target_patches(x), mask) == 0
    torch.testing.assert_close(mae.pixels_from_prediction(x, mae.target_patches(x)), x, atol=1e-4, rtol=0)


def test_init_follows_official_recipe() -> None:
    mae = create_mae("mae_vit_small_patch16", depth=1, decoder_depth=1)
    assert not mae.encoder.pos_embed.requires_grad
    assert torch.equal(mae.encoder.pos_embed[0, 0], torch.zeros(384))
    assert 0.015 < mae.mask_token.std().item() < 0.025
    w = mae.encoder.blocks[0].mlp.fc1.weight
    bound = (6 / (w.shape[0] + w.shape[1])) ** 0.5
    assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound  # xavier_uniform
    assert torch.equal(mae.encoder.blocks[0].mlp.fc1.bias, torch.zeros_like(mae.encoder.blocks[0].mlp.fc1.bias))


@pytest.mark.parametrize("variant", sorted(MAE_VARIANTS))
def test_every_variant_builds_and_runs_small(variant: str) -> None:
    mae = create_mae(variant, depth=1, decoder_depth=1, img_size=32)
    widths = {"tiny": 192, "small": 384, "base": 768, "large": 1024, "huge": 1280}
    assert mae.encoder.embed_dim == widths[variant.split("_")[2]]
    assert mae.patch_size == 16 and mae.decoder_pred.out_features == 256
    out = mae(torch.randn(1, 1, 32, 32))
    assert torch.isfinite(out.loss)


def test_size_overrides_apply() -> None:
    mae = create_mae("mae_vit_base_patch16", embed_dim=96, depth=3, num_heads=3, patch_size=8, img_size=(32, 16),
                     decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2, in_chans=5)
    assert (mae.encoder.embed_dim, len(mae.encoder.blocks), mae.patch_size, mae.num_patches) == (96, 3, 8, 8)
    assert mae.decoder_pred.out_features == 8 * 8 * 5


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"img_size": (64, 50)}, "img_size"),
        ({"img_size": 40, "patch_size": 16}, "img_size"),
        ({"in_chans": 0}, "in_chans"),
        ({"mask_ratio": 1.0}, "mask_ratio"),
        ({"decoder_embed_dim": 100, "decoder_num_heads": 16}, "decoder_embed_dim"),
    ],
)
def test_bad_sizes_raise_naming_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        create_mae("mae_vit_tiny_patch16", **kwargs)


def test_unknown_variant() -> None:
    with pytest.raises(ValueError, match="unknown MAE variant"):
        create_mae("mae_vit_gigantic_patch16")


def test_input_not_matching_model_is_rejected() -> None:
    with pytest.raises(ValueError, match="in_chans=1"):
        tiny()(torch.randn(1, 3, 64, 48))
