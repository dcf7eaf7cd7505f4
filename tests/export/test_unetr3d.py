"""3D MAE encoder -> MONAI ViT / UNETR (spatial_dims=3): same hidden states, positions, refusals."""

from __future__ import annotations

from typing import Any

import pytest
import torch
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


def test_unetr3d_new_size_recomputes_positions_exactly() -> None:
    model = pretrained(True, patch_size=16, embed_dim=24, depth=10, num_heads=2)
    unetr = build_unetr3d(model.encoder.state_dict(), (48, 32, 32), out_channels=2, num_heads=2).eval()
    expected = sincos_pos_embed_3d(24, (3, 2, 2))
    torch.testing.assert_close(unetr.vit.patch_embedding.position_embeddings.data, expected)
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
