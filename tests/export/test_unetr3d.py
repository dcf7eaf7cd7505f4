"""3D MAE encoder -> MONAI ViT / UNETR (spatial_dims=3): same hidden states, positions, refusals."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from monai.networks.blocks.pos_embed_utils import build_sincos_position_embedding
from monai.networks.nets import UNETR, ViT

from medmae.export.unetr import EncoderUNETR
from medmae.export.unetr3d import build_unetr3d, build_vit3d, monai_vit3d_state
from medmae.models import MaskedAutoencoder3D
from medmae.models.pos_embed3d import sincos_pos_embed_3d

pytestmark = pytest.mark.usefixtures("one_thread")


def pretrained(cls_token: bool = True, **overrides: Any) -> MaskedAutoencoder3D:
    """A tiny 3D MAE with every weight perturbed, so a wrongly mapped norm or bias shows."""
    torch.manual_seed(0)
    size = {"img_size": (32, 32, 16), "patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": 4}
    model = MaskedAutoencoder3D(
        **{**size, **overrides}, cls_token=cls_token, decoder_embed_dim=24, decoder_depth=1, decoder_num_heads=2
    )
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def assert_hidden_states_equal(model: MaskedAutoencoder3D, vit: ViT, vols: torch.Tensor) -> None:
    with torch.no_grad():
        latent, _, _ = model.forward_encoder(vols, 0.0)
        _, ours = model.encoder.forward_intermediates(vols)
        out, hidden = vit(vols)
    assert len(hidden) == len(ours) == model.encoder.depth
    for mine, theirs in zip(ours, hidden, strict=True):
        torch.testing.assert_close(theirs, mine, atol=1e-5, rtol=0)
    torch.testing.assert_close(out, latent, atol=1e-5, rtol=0)


@pytest.mark.parametrize("cls_token", [True, False])
def test_mae_encoder_equals_monai_vit_hidden_states(cls_token: bool) -> None:
    model = pretrained(cls_token)
    vit = build_vit3d(model).eval()
    assert type(vit) is ViT and hasattr(vit, "cls_token") == cls_token
    assert_hidden_states_equal(model, vit, torch.randn(2, 1, 32, 32, 16))
    # the bare state_dict path gives the same network
    bare = build_vit3d(model.encoder.state_dict(), (32, 32, 16), num_heads=4).eval()
    assert_hidden_states_equal(model, bare, torch.randn(1, 1, 32, 32, 16))
    keys = monai_vit3d_state(model.encoder.state_dict())
    assert keys["patch_embedding.patch_embeddings.weight"].shape == (48, 1, 8, 8, 8)
    assert ("cls_token" in keys) == cls_token and keys["patch_embedding.position_embeddings"].shape == (1, 32, 48)


@pytest.mark.parametrize("cls_token", [True, False])
def test_unetr3d_carries_encoder_hidden_states(cls_token: bool) -> None:
    model = pretrained(cls_token, patch_size=16, embed_dim=24, depth=10, num_heads=2)
    unetr = build_unetr3d(model, img_size=(32, 32, 16), out_channels=3, feature_size=8).eval()
    assert type(unetr) is (EncoderUNETR if cls_token else UNETR)
    assert all(m.eps == 1e-5 for m in unetr.vit.modules() if isinstance(m, torch.nn.LayerNorm))
    vols = torch.randn(1, 1, 32, 32, 16)
    assert_hidden_states_equal(model, unetr.vit, vols)
    with torch.no_grad():
        assert unetr(vols).shape == (1, 3, 32, 32, 16)


def monai_sincos(embed_dim: int, grid: tuple[int, int, int]) -> torch.Tensor:
    """MONAI's own 3D sin-cos positions: tokens row-major over ``grid`` (``meshgrid`` ``ij``, as a
    ``Conv3d`` flattens), channels ``[sin|cos](i1), [sin|cos](i0), [sin|cos](i2)`` (its "w, h, d")."""
    return build_sincos_position_embedding(list(grid), embed_dim, spatial_dims=3).detach()


@pytest.mark.filterwarnings("ignore:torch.meshgrid")  # MONAI calls meshgrid without `indexing` (ij)
def test_sincos_positions_equal_monais_independent_builder() -> None:
    """medmae's 3D positions are MONAI's ``build_sincos_position_embedding`` (and what a MONAI ViT with
    ``pos_embed_type="sincos"`` holds for the same input), on a grid whose three sizes all differ."""
    grid = (2, 3, 4)
    ours = sincos_pos_embed_3d(48, grid)
    torch.testing.assert_close(ours, monai_sincos(48, grid), atol=1e-6, rtol=0)
    vit = ViT(1, (32, 48, 64), 16, hidden_size=48, mlp_dim=96, num_layers=1, num_heads=2, pos_embed_type="sincos")
    torch.testing.assert_close(ours, vit.patch_embedding.position_embeddings.detach(), atol=1e-6, rtol=0)
    # spelled out: token (i0, i1, i2) = (1, 2, 3) is (1 * 3 + 2) * 4 + 3; each axis has 8 sin and 8 cos
    # channels, frequency 1 first, so every 8th channel is sin/cos of i1, i0, i2 themselves
    i0, i1, i2 = 1.0, 2.0, 3.0
    by_hand = [math.sin(i1), math.cos(i1), math.sin(i0), math.cos(i0), math.sin(i2), math.cos(i2)]
    torch.testing.assert_close(ours[0, (1 * 3 + 2) * 4 + 3, ::8], torch.tensor(by_hand))
    with_cls = sincos_pos_embed_3d(48, grid, cls_token=True)
    assert torch.equal(with_cls[:, 0], torch.zeros(1, 48)) and torch.equal(with_cls[:, 1:], ours)


@pytest.mark.filterwarnings("ignore:torch.meshgrid")
def test_unetr3d_new_size_recomputes_positions_exactly() -> None:
    model = pretrained(True, patch_size=16, embed_dim=24, depth=10, num_heads=2)
    unetr = build_unetr3d(model.encoder.state_dict(), (48, 32, 32), out_channels=2, num_heads=2).eval()
    expected = monai_sincos(24, (3, 2, 2))  # 48 / 16, 32 / 16, 32 / 16 patches
    torch.testing.assert_close(unetr.vit.patch_embedding.position_embeddings.data, expected, atol=1e-6, rtol=0)
    resized = pretrained(True, img_size=(48, 32, 32), patch_size=16, embed_dim=24, depth=10, num_heads=2)
    state = {k: v for k, v in model.encoder.state_dict().items() if k != "pos_embed"}
    missing, unexpected = resized.encoder.load_state_dict(state, strict=False)  # positions of the new grid
    assert missing == ["pos_embed"] and unexpected == []
    assert_hidden_states_equal(resized, unetr.vit, torch.randn(1, 1, 48, 32, 32))


def test_unetr3d_refusals_name_the_problem() -> None:
    with pytest.raises(ValueError, match="patch_size"):
        build_unetr3d(pretrained(True), (32, 32, 16), out_channels=2)  # 8-voxel patches
    with pytest.raises(ValueError, match="depth"):
        build_unetr3d(pretrained(True, patch_size=16, embed_dim=24), (32, 32, 16), out_channels=2)
    ten = pretrained(True, patch_size=16, embed_dim=24, depth=10, num_heads=2)
    with pytest.raises(ValueError, match="img_size"):
        build_unetr3d(ten, (32, 32, 24), out_channels=2)
    with pytest.raises(ValueError, match="num_heads"):
        build_unetr3d(ten.encoder.state_dict(), (32, 32, 16), out_channels=2)
    state = {k: v for k, v in ten.encoder.state_dict().items() if not k.startswith("blocks.9.mlp")}
    with pytest.raises(ValueError, match="missing"):
        build_unetr3d(state, (32, 32, 16), out_channels=2, num_heads=2)
