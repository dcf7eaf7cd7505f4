"""No encoder tensor is dropped silently on the way into MONAI's ViT / UNETR (2D and 3D).

A LayerScale encoder (timm ``init_values``: ``blocks.i.ls1.gamma`` / ``ls2.gamma``) has no place in
MONAI's blocks; before the check it loaded without error and computed another function. Every source
tensor must be consumed by the key map or be in ``UNUSED_ENCODER_KEYS``.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from timm.models.vision_transformer import Block
from torch import nn

from medmae.export import (
    CardError,
    build_unetr,
    build_unetr3d_from_export,
    export_encoder,
    load_timm_encoder,
    load_vit3d,
)
from medmae.export.unetr import UNUSED_ENCODER_KEYS, timm_to_monai_vit
from medmae.export.unetr3d import build_unetr3d, build_vit3d
from medmae.models import MaskedAutoencoder3D, create_mae
from medmae.models.mae import MaskedAutoencoder

pytestmark = pytest.mark.usefixtures("one_thread")

#: a timm ViT whose architecture has LayerScale (``init_values=1e-5``), patch 16, class token
LAYERSCALE_ARCH = "vit_base_patch16_plus_240"


def layerscale_export_2d(out: Path) -> Path:
    """A 10-block, patch-16 LayerScale encoder at 32x32: a valid card MONAI UNETR would otherwise take."""
    torch.manual_seed(0)
    mae = MaskedAutoencoder(
        LAYERSCALE_ARCH,
        img_size=32,
        decoder_embed_dim=16,
        decoder_depth=1,
        decoder_num_heads=2,
        encoder_kwargs={"embed_dim": 48, "depth": 10, "num_heads": 2},
    )
    assert "blocks.0.ls1.gamma" in mae.encoder.state_dict()
    export_encoder(mae.eval(), out)
    return out


def layerscale_mae3d() -> MaskedAutoencoder3D:
    """A 3D MAE whose encoder blocks carry LayerScale (timm ``Block(init_values=1e-5)``), else as medmae's."""
    torch.manual_seed(0)
    model = MaskedAutoencoder3D(
        img_size=(32, 32, 16),
        patch_size=16,
        embed_dim=24,
        depth=10,
        num_heads=2,
        decoder_embed_dim=24,
        decoder_depth=1,
        decoder_num_heads=2,
    )
    norm = partial(nn.LayerNorm, eps=1e-5)
    model.encoder.blocks = nn.Sequential(
        *[Block(24, 2, mlp_ratio=4.0, qkv_bias=True, norm_layer=norm, init_values=1e-5) for _ in range(10)]
    )
    return model.eval()


def test_2d_layerscale_encoder_is_refused_naming_the_keys(tmp_path: Path) -> None:
    export = layerscale_export_2d(tmp_path / "ls")
    with pytest.raises(ValueError, match=r"encoder\.json: encoder weights hold 20 tensor\(s\).*blocks\.0\.ls1\.gamma"):
        build_unetr(export, out_channels=2)
    with pytest.raises(ValueError, match=r"blocks\.0\.ls1\.gamma"):
        build_unetr(export, out_channels=2, cls_token=False)
    # timm itself carries LayerScale, so the timm loader takes every tensor
    vit = load_timm_encoder(export)
    assert "blocks.9.ls2.gamma" in vit.state_dict()


def test_3d_layerscale_encoder_is_refused_naming_the_keys(tmp_path: Path) -> None:
    model = layerscale_mae3d()
    with pytest.raises(ValueError, match=r"blocks\.0\.ls1\.gamma"):
        build_unetr3d(model, (32, 32, 16), out_channels=2)
    with pytest.raises(ValueError, match=r"blocks\.0\.ls1\.gamma"):
        build_vit3d(model.encoder.state_dict(), (32, 32, 16), num_heads=2)
    export_encoder(model, tmp_path / "ls3d")
    with pytest.raises(ValueError, match=r"ls3d/encoder\.json: .*blocks\.0\.ls1\.gamma.*\(20 in all\)"):
        build_unetr3d_from_export(tmp_path / "ls3d", out_channels=2)
    with pytest.raises(ValueError, match=r"blocks\.0\.ls1\.gamma"):
        load_vit3d(tmp_path / "ls3d")


def test_3d_positions_other_than_the_fixed_sincos_are_refused(tmp_path: Path) -> None:
    """The 3D loaders recompute positions instead of reading them: an export whose ``pos_embed`` is not
    the card's fixed sin-cos would lose it, so it is refused."""
    model = MaskedAutoencoder3D(
        img_size=(32, 32, 16), patch_size=16, embed_dim=24, depth=10, num_heads=2, decoder_embed_dim=24,
        decoder_depth=1, decoder_num_heads=2,
    )  # fmt: skip
    export_encoder(model.eval(), tmp_path)
    build_unetr3d_from_export(tmp_path, out_channels=2)  # the fixed positions load
    weights = tmp_path / "encoder.safetensors"
    state = load_file(str(weights))
    state["pos_embed"] = state["pos_embed"] + 0.01 * torch.randn_like(state["pos_embed"])
    save_file(state, str(weights))
    for load in (partial(build_unetr3d_from_export, out_channels=2), load_vit3d):
        with pytest.raises(CardError, match=r"encoder\.json: weights 'pos_embed' are not the fixed 3D sin-cos"):
            load(tmp_path)


def test_a_stray_tensor_in_an_export_is_named_by_every_loader(tmp_path: Path) -> None:
    """One unknown tensor added to a plain export: UNETR and timm both refuse it by name."""
    torch.manual_seed(1)
    mae = create_mae("mae_vit_tiny_patch16", img_size=32, depth=10, decoder_depth=1)
    export_encoder(mae.eval(), tmp_path)
    build_unetr(tmp_path, out_channels=2)  # the plain export loads
    weights = tmp_path / "encoder.safetensors"
    state = load_file(str(weights))
    state["blocks.3.attn.q_norm.weight"] = torch.ones(64)
    save_file(state, str(weights))
    with pytest.raises(ValueError, match=r"1 tensor\(s\).*\[blocks\.3\.attn\.q_norm\.weight\]"):
        build_unetr(tmp_path, out_channels=2)
    with pytest.raises(ValueError, match=r"unexpected \[blocks\.3\.attn\.q_norm\.weight\]"):
        load_timm_encoder(tmp_path)


def test_only_the_documented_keys_may_stay_unused() -> None:
    """``cls_token=False`` leaves the class token out (documented); an extra block is not allowed."""
    torch.manual_seed(2)
    state = create_mae("mae_vit_tiny_patch16", img_size=32, depth=2, decoder_depth=1).encoder.state_dict()
    assert UNUSED_ENCODER_KEYS == {"cls_token"}
    assert "cls_token" not in timm_to_monai_vit(state, depth=2, cls_token=False)
    with pytest.raises(ValueError, match=r"where: encoder weights hold 12 tensor\(s\).*blocks\.1\.attn\.proj\.bias"):
        timm_to_monai_vit(state, depth=1, cls_token=True, where="where")
