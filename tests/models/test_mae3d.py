"""3D MAE: patch layout, masking counts, sin-cos positions, gradients, learning, and config errors."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
from monai.networks.blocks.pos_embed_utils import build_sincos_position_embedding

from medmae.models import MAE3D_VARIANTS, MaskedAutoencoder3D, create_mae3d, patchify3d, unpatchify3d
from medmae.models.pos_embed3d import sincos_1d, sincos_pos_embed_3d

#: a tiny non-cubic model: 32x32x16 voxels, 8-voxel patches -> grid 4x4x2 = 32 tokens
TINY: dict[str, Any] = {
    "img_size": (32, 32, 16),
    "patch_size": 8,
    "embed_dim": 48,
    "depth": 2,
    "num_heads": 4,
    "decoder_embed_dim": 24,
    "decoder_depth": 1,
    "decoder_num_heads": 2,
}


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny tensors gain nothing from intra-op threads; on a shared 2-core machine two threads
    wait on each other (10 tiny steps: 0.1 s on one thread, 7.5 s on two under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(**overrides: Any) -> MaskedAutoencoder3D:
    torch.manual_seed(0)
    return MaskedAutoencoder3D(**{**TINY, **overrides})


def smooth_volumes(batch: int, size: tuple[int, int, int], channels: int = 1) -> torch.Tensor:
    """Structured synthetic scans (a blob plus gradients), learnable unlike white noise."""
    z, y, x = torch.meshgrid(*(torch.linspace(-1, 1, s) for s in size), indexing="ij")
    vols = [torch.exp(-4 * ((z - 0.3 * b) ** 2 + y**2 + x**2)) + 0.5 * z * x for b in range(batch)]
    return torch.stack(vols).unsqueeze(1).repeat(1, channels, 1, 1, 1)


def test_patchify3d_round_trip_non_cubic_and_layout() -> None:
    vols = torch.randn(2, 3, 16, 24, 8)
    patches = patchify3d(vols, 8)
    assert patches.shape == (2, 2 * 3 * 1, 8**3 * 3)
    assert torch.equal(unpatchify3d(patches, 8, (2, 3, 1), 3), vols)
    # token (i0, i1, i2) = (1, 2, 0) is row-major index 1*3 + 2 = 5, its vector laid out (p, p, p, C)
    block = vols[:, :, 8:16, 16:24, 0:8].permute(0, 2, 3, 4, 1).reshape(2, -1)
    assert torch.equal(patches[:, 5], block)
    with pytest.raises(ValueError, match="patch_size"):
        patchify3d(vols, 5)


def test_exact_visible_token_count_per_sample() -> None:
    model = tiny(mask_ratio=0.75)
    latent, mask, ids_restore = model.forward_encoder(
        torch.randn(3, 1, 32, 32, 16), 0.75, torch.Generator().manual_seed(1)
    )
    assert model.num_patches == 32
    assert latent.shape == (3, 1 + 8, 48)  # cls + round(32 * 0.25) visible
    assert mask.sum(dim=1).tolist() == [24.0, 24.0, 24.0]
    assert not torch.equal(mask[0], mask[1])  # masks are drawn per sample
    assert ids_restore.sort(dim=1).values.eq(torch.arange(32)).all()


@pytest.mark.filterwarnings("ignore:torch.meshgrid")  # raised inside MONAI's builder
def test_sincos_3d_non_cubic_grid_analytic_values() -> None:
    dim, grid = 48, (10, 10, 6)  # a 160x160x96 crop with 16-voxel patches
    emb = sincos_pos_embed_3d(dim, grid)
    assert emb.shape == (1, 600, dim)
    third = dim // 3
    for i0, i1, i2 in [(0, 0, 0), (3, 7, 5), (9, 2, 1)]:
        token = (i0 * 10 + i1) * 6 + i2
        pos = lambda v: torch.tensor([float(v)])  # noqa: E731
        expected = torch.cat([sincos_1d(third, pos(i1)), sincos_1d(third, pos(i0)), sincos_1d(third, pos(i2))], 1)
        torch.testing.assert_close(emb[0, token], expected[0].float())
    row = emb[0, (3 * 10 + 7) * 6 + 5]
    assert row[0] == pytest.approx(torch.sin(torch.tensor(7.0)).item(), abs=1e-6)  # lowest frequency is 1
    assert row[8] == pytest.approx(torch.cos(torch.tensor(7.0)).item(), abs=1e-6)  # cos half of the i1 block
    assert row[16] == pytest.approx(torch.sin(torch.tensor(3.0)).item(), abs=1e-6)  # i0 block
    assert row[32] == pytest.approx(torch.sin(torch.tensor(5.0)).item(), abs=1e-6)  # i2 block
    distances = torch.cdist(emb[0].double(), emb[0].double()) + torch.eye(600, dtype=torch.float64) * 1e3
    assert distances.min() > 1e-2  # every position distinct
    torch.testing.assert_close(emb, build_sincos_position_embedding(list(grid), dim, 3).data, atol=1e-5, rtol=0)
    with_cls = sincos_pos_embed_3d(dim, grid, cls_token=True)
    assert with_cls.shape == (1, 601, dim) and not with_cls[0, 0].any()
    with pytest.raises(ValueError, match="embed_dim"):
        sincos_pos_embed_3d(40, grid)


def test_every_parameter_gets_a_gradient_and_positions_are_frozen_buffers() -> None:
    model = tiny()
    model(smooth_volumes(2, (32, 32, 16)), generator=torch.Generator().manual_seed(0)).loss.backward()
    assert [name for name, p in model.named_parameters() if p.grad is None] == []
    names = {name for name, _ in model.named_parameters()}
    assert "encoder.pos_embed" not in names and "decoder_pos_embed" not in names
    assert not model.encoder.pos_embed.requires_grad and not model.decoder_pos_embed.requires_grad
    assert "pos_embed" in model.encoder.state_dict()  # exported with the weights
    assert all(block.attn.fused_attn for block in model.encoder.blocks)


def test_tiny_model_lowers_loss_on_fixed_batch() -> None:
    model = tiny()
    vols = smooth_volumes(2, (32, 32, 16))
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3, betas=(0.9, 0.95))
    losses = []
    for _ in range(10):
        out = model(vols, generator=torch.Generator().manual_seed(0))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.85 * losses[0], losses


@pytest.mark.parametrize("cls_token", [True, False])
def test_non_cubic_input_end_to_end(cls_token: bool) -> None:
    model = tiny(cls_token=cls_token, in_chans=2, norm_pix_loss=True)
    vols = smooth_volumes(2, (32, 32, 16), channels=2)
    out = model(vols, generator=torch.Generator().manual_seed(0))
    assert out.pred.shape == (2, 32, 8**3 * 2) and out.loss.dtype == torch.float32
    assert torch.isfinite(out.loss)
    assert model.pixels_from_prediction(vols, out.pred).shape == vols.shape
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the loss stays fp32 under mixed precision
        mixed = model(vols, generator=torch.Generator().manual_seed(0))
    assert mixed.pred.dtype == torch.bfloat16 and mixed.loss.dtype == torch.float32
    with pytest.raises(ValueError, match="does not match the model"):
        model(torch.randn(2, 2, 32, 16, 32))


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"patch_size": 12}, "patch_size"),
        ({"img_size": (32, 32, 20)}, "img_size"),
        ({"in_chans": 0}, "in_chans"),
        ({"mask_ratio": 0.99}, "mask_ratio"),
        ({"mask_ratio": 1.0}, "mask_ratio"),
        ({"embed_dim": 40, "num_heads": 4}, "embed_dim"),
        ({"num_heads": 5}, "num_heads"),
        ({"decoder_embed_dim": 20}, "decoder_embed_dim"),
        ({"depth": 0}, "depth"),
    ],
)
def test_bad_config_raises_value_error_naming_field(overrides: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        MaskedAutoencoder3D(**{**TINY, **overrides})


def test_variants_and_encoder_config() -> None:
    with torch.device("meta"):  # sizes only: no 90M-parameter allocation in the test suite
        base = create_mae3d("mae3d_vit_base_patch16", img_size=(160, 160, 96))
    config = base.encoder_config()
    assert config["embed_dim"] == 768 and config["depth"] == 12 and config["num_heads"] == 12
    assert config["patch_size"] == 16 and config["img_size"] == [160, 160, 96] and config["spatial_dims"] == 3
    assert base.grid == (10, 10, 6) and base.num_patches == 600
    assert base.decoder_embed.out_features == 384 and len(base.decoder_blocks) == 4
    assert {"mae3d_vit_tiny_patch16", "mae3d_vit_base_patch16"} <= set(MAE3D_VARIANTS)
    small = create_mae3d("mae3d_vit_tiny_patch16", img_size=32, depth=2, decoder_depth=1, patch_size=8)
    assert small.encoder_config()["embed_dim"] == 192 and small.num_patches == 64
    with pytest.raises(ValueError, match="unknown 3D MAE variant"):
        create_mae3d("mae3d_vit_giant")
