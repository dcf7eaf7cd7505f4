"""3D exports: checkpoint -> card (``medmae_vit3d``) -> MONAI ViT / UNETR 3D, card validation, 2D/3D refusals."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from monai.networks.nets import ViT

from medmae.data import CacheDataModule
from medmae.data.intensity import IntensityRule
from medmae.data.volume import VolumeOptions, VolumeTransform
from medmae.export import (
    CardError,
    VolumePreprocessor,
    build_unetr,
    build_unetr3d_from_export,
    export_encoder,
    load_card,
    load_timm_encoder,
    load_vit3d,
    preprocessing_from_card,
)
from medmae.export.cli import main as export_main
from medmae.export.unetr import EncoderUNETR
from medmae.models import MaskedAutoencoder3D, create_mae

TINY_3D = {"img_size": (32, 32, 16), "patch_size": 16, "embed_dim": 24, "depth": 10, "num_heads": 2}


pytestmark = pytest.mark.usefixtures("one_thread")


def volume_record(size: tuple[int, int, int] = (32, 32, 16), **rule: Any) -> dict[str, Any]:
    """The 3D card's preprocessing: what ``VolumeTransform.describe()`` writes."""
    return VolumeTransform(
        VolumeOptions(size=size, spacing_mm=(2.0, 1.5, 1.5)), IntensityRule.checked(**rule)
    ).describe()


def perturbed_mae3d(cls_token: bool = True) -> MaskedAutoencoder3D:
    torch.manual_seed(0)
    model = MaskedAutoencoder3D(
        **TINY_3D, cls_token=cls_token, decoder_embed_dim=24, decoder_depth=1, decoder_num_heads=2
    )
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


@pytest.fixture
def export3d(tmp_path: Path) -> tuple[Path, MaskedAutoencoder3D]:
    model = perturbed_mae3d()
    export_encoder(model, tmp_path / "enc3d", preprocessing=volume_record())
    return tmp_path / "enc3d", model


def _hidden_equal(model: MaskedAutoencoder3D, vit: ViT, vols: torch.Tensor) -> None:
    with torch.no_grad():
        out, hidden = vit(vols)
        normed, ours = model.encoder.forward_intermediates(vols)
    assert len(hidden) == len(ours) == model.encoder.depth
    for theirs, mine in zip(hidden, ours, strict=True):
        torch.testing.assert_close(theirs, mine, atol=1e-5, rtol=0)
    torch.testing.assert_close(out, normed, atol=1e-5, rtol=0)


def test_3d_export_loads_into_monai_unetr3d_and_vit_with_the_encoders_hidden_states(export3d) -> None:
    out, model = export3d
    card = load_card(out)
    assert card["encoder"] == model.encoder_config() and card["encoder"]["arch"] == "medmae_vit3d"
    vols = torch.randn(1, 1, 32, 32, 16)
    unetr = build_unetr3d_from_export(out, out_channels=3, feature_size=8).eval()
    assert type(unetr) is EncoderUNETR
    _hidden_equal(model, unetr.vit, vols)
    with torch.no_grad():
        assert unetr(vols).shape == (1, 3, 32, 32, 16)
    _hidden_equal(model, load_vit3d(out).eval(), vols)
    # the baseline: the same network (same parameter names and shapes) without the weights
    rnd = build_unetr3d_from_export(out, out_channels=3, feature_size=8, load_weights=False)
    assert {k: v.shape for k, v in rnd.state_dict().items()} == {k: v.shape for k, v in unetr.state_dict().items()}
    assert not torch.equal(rnd.vit.blocks[3].attn.qkv.weight, unetr.vit.blocks[3].attn.qkv.weight)
    # another fine-tuning size: positions recomputed, the rest exact
    bigger = build_unetr3d_from_export(out, out_channels=2, img_size=(48, 32, 32), feature_size=8).eval()
    assert bigger(torch.randn(1, 1, 48, 32, 32)).shape == (1, 2, 48, 32, 32)
    assert isinstance(preprocessing_from_card(card), VolumePreprocessor)


def test_3d_checkpoint_exports_through_medmae_export(tmp_path: Path) -> None:
    """``medmae export`` of a 3D pretraining checkpoint (MAEPretrainModule with a ``mae3d_*`` variant)."""
    from medmae.train.module import MAEPretrainModule

    torch.manual_seed(0)
    hp = dict(variant="mae3d_vit_tiny_patch16", mae=dict(img_size=[32, 32, 16], embed_dim=24, depth=10, num_heads=2,
              decoder_embed_dim=24, decoder_depth=1, decoder_num_heads=2))  # fmt: skip
    module = MAEPretrainModule(**hp)
    record = CacheDataModule(str(tmp_path / "no_cache"), volume=VolumeOptions(size=(32, 32, 16))).preprocessing()
    ckpt = {
        "state_dict": module.state_dict(),
        "hyper_parameters": dict(module.hparams),
        "medmae": {"preprocessing": record},
        "global_step": 3,
        "epoch": 0,
    }
    torch.save(ckpt, tmp_path / "mae3d.ckpt")
    assert export_main([str(tmp_path / "mae3d.ckpt"), "--out", str(tmp_path / "out")]) == 0
    card = load_card(tmp_path / "out")
    assert card["encoder"]["arch"] == "medmae_vit3d" and card["pretraining"]["global_step"] == 3
    pre = preprocessing_from_card(card)
    assert isinstance(pre, VolumePreprocessor) and pre.size == (32, 32, 16)
    unetr = build_unetr3d_from_export(tmp_path / "out", out_channels=2, feature_size=8).eval()
    model = module.model.eval()
    _hidden_equal(model, unetr.vit, torch.randn(1, 1, 32, 32, 16))


def test_2d_loaders_refuse_a_3d_export_in_one_line_and_3d_loaders_a_2d_one(export3d, tmp_path: Path) -> None:
    out, _ = export3d
    for loader in (load_timm_encoder, lambda d: build_unetr(d, 2)):
        with pytest.raises(
            CardError, match=r"encoder\.arch' is 'medmae_vit3d', a 3D encoder.*build_unetr3d_from_export"
        ) as e:
            loader(out)
        assert "\n" not in str(e.value)
    flat = tmp_path / "enc2d"
    export_encoder(create_mae("mae_vit_tiny_patch16", img_size=32, depth=2, decoder_depth=1), flat)
    for loader in (lambda d: build_unetr3d_from_export(d, 2), load_vit3d):
        with pytest.raises(CardError, match=r"a 2D encoder; the 3D loaders"):
            loader(flat)


def _edit(path: Path, change: Callable[[dict], None]) -> None:
    card = json.loads((path / "encoder.json").read_text())
    change(card)
    (path / "encoder.json").write_text(json.dumps(card))


def _set(section: str, key: str, value: Any) -> Callable[[dict], None]:
    def change(card: dict) -> None:
        node = card
        for part in section.split("."):
            node = node[part]
        if value is _DELETE:
            del node[key]
        else:
            node[key] = value

    return change


_DELETE = object()


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (_set("encoder", "depth", _DELETE), "encoder.depth"),
        (_set("encoder", "img_size", [32, 32]), "encoder.img_size"),
        (_set("encoder", "img_size", [32, 32, 20]), "encoder.img_size"),
        (_set("encoder", "embed_dim", "24"), "encoder.embed_dim"),
        (_set("encoder", "embed_dim", 20), "encoder.embed_dim"),
        (_set("encoder", "num_heads", 5), "encoder.num_heads"),
        (_set("encoder", "in_chans", 0), "encoder.in_chans"),
        (_set("encoder", "cls_token", "yes"), "encoder.cls_token"),
        (_set("encoder", "mlp_ratio", float("inf")), "encoder.mlp_ratio"),
        (_set("encoder", "layer_norm_eps", -1), "encoder.layer_norm_eps"),
        (_set("encoder", "spatial_dims", 2), "encoder.spatial_dims"),
        (_set("encoder", "patch_size", 10**6), "encoder.patch_size"),
        (_set("preprocessing", "spatial_dims", 2), "preprocessing.spatial_dims"),
    ],
)
def test_bad_3d_cards_name_the_field(export3d, change, field: str) -> None:
    out, _ = export3d
    _edit(out, change)
    with pytest.raises(CardError, match=rf"encoder\.json: field '{field}'"):
        load_card(out)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (_set("preprocessing.volume", "size", _DELETE), "preprocessing.volume.size"),
        (_set("preprocessing.volume", "size", [32, 32]), "preprocessing.volume.size"),
        (_set("preprocessing.volume", "spacing_mm", [2.0, 0.0, 1.5]), "preprocessing.volume.spacing_mm"),
        (_set("preprocessing.volume", "spacing_mm", "2"), "preprocessing.volume.spacing_mm"),
        (_set("preprocessing", "channels", 3), "preprocessing.channels"),
        (_set("preprocessing.intensity.ct", "mode", "mixed"), "preprocessing.intensity.ct.mode"),
        (_set("preprocessing.intensity.ct", "inference_window", 7), "preprocessing.intensity.ct.inference_window"),
        (_set("preprocessing.intensity.other", "percentiles", [1, 2]), "preprocessing.intensity.other.percentiles"),
    ],
)
def test_bad_3d_preprocessing_names_the_field(export3d, change, field: str) -> None:
    out, _ = export3d
    _edit(out, change)
    with pytest.raises(CardError, match=rf"field '{field}'"):
        preprocessing_from_card(load_card(out), where=str(out / "encoder.json"))


def test_weights_that_disagree_with_the_card_are_named(export3d, tmp_path: Path) -> None:
    out, _ = export3d
    other = tmp_path / "other"
    shutil.copytree(out, other)
    _edit(other, _set("encoder", "depth", 11))
    with pytest.raises(CardError, match=r"field 'encoder.depth' is 11 but the weights have 10"):
        build_unetr3d_from_export(other, 2)
    _edit(other, _set("encoder", "depth", 10))
    _edit(other, _set("encoder", "mlp_ratio", 2.0))
    with pytest.raises(CardError, match=r"field 'encoder.mlp_ratio'"):
        load_vit3d(other)
