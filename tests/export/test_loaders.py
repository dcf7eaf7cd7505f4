"""The loader matrix: same size strict, avg pool, new size, new channels, UNETR equality, card-only rebuild."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from monai.networks.nets import UNETR
from safetensors.torch import load_file, save_file

from medmae.export import CardError, build_unetr, export_encoder, load_card, load_timm_encoder
from medmae.export.adapt import adapt_patch_embed_channels
from medmae.models import create_mae


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    """A 2-block, patch-8, 32x48 one-channel encoder with random (non-init) weights."""
    torch.manual_seed(0)
    mae = create_mae("mae_vit_tiny_patch16", img_size=(32, 48), patch_size=8, depth=2, decoder_depth=1).eval()
    with torch.no_grad():
        mae.encoder.norm.weight.normal_(1.0, 0.1)  # so that dropping `norm` is visible
    out = tmp_path_factory.mktemp("export")
    export_encoder(mae, out)
    return out, mae


@pytest.fixture(scope="module")
def unetr_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 12-block, patch-16 encoder at 64x64: what MONAI UNETR can carry."""
    torch.manual_seed(1)
    mae = create_mae("mae_vit_tiny_patch16", img_size=64, depth=12, decoder_depth=1)
    out = tmp_path_factory.mktemp("unetr_export")
    export_encoder(mae, out)
    return out


def test_same_size_loads_strictly_and_matches_the_mae_encoder(tiny_export) -> None:
    path, mae = tiny_export
    vit = load_timm_encoder(path).eval()
    x = torch.rand(2, 1, 32, 48)
    torch.testing.assert_close(vit.forward_features(x), mae.forward_encoder(x, 0.0)[0], rtol=0, atol=1e-6)


def test_avg_pool_drops_norm_and_adds_a_fresh_fc_norm(tiny_export) -> None:
    path, mae = tiny_export
    vit = load_timm_encoder(path, global_pool="avg", num_classes=3).eval()
    assert isinstance(vit.norm, torch.nn.Identity)
    assert torch.equal(vit.fc_norm.weight, torch.ones_like(vit.fc_norm.weight))  # fresh, not the old norm
    torch.testing.assert_close(vit.blocks[1].mlp.fc2.weight, mae.encoder.blocks[1].mlp.fc2.weight)
    assert vit(torch.rand(2, 1, 32, 48)).shape == (2, 3)


def test_new_size_resamples_positions_and_leaves_other_weights_equal(tiny_export) -> None:
    path, mae = tiny_export
    vit = load_timm_encoder(path, img_size=64)
    assert vit.pos_embed.shape == (1, 1 + 8 * 8, 192)
    torch.testing.assert_close(vit.pos_embed[:, :1], mae.encoder.pos_embed[:, :1])  # class slot kept
    ref = mae.encoder.state_dict()
    for name, value in vit.state_dict().items():
        if name != "pos_embed":
            assert torch.equal(value, ref[name]), name
    # the resampled grid interpolates the old one: its corners stay the old corners' neighbourhood
    old = mae.encoder.pos_embed[0, 1:].reshape(4, 6, -1)
    new = vit.pos_embed[0, 1:].reshape(8, 8, -1)
    assert torch.nn.functional.cosine_similarity(new[0, 0], old[0, 0], dim=0) > 0.9


@pytest.mark.parametrize("in_chans", [3, 1])
def test_new_channel_count_follows_the_equal_channel_rule(tmp_path: Path, in_chans: int) -> None:
    source_chans = 1 if in_chans == 3 else 3
    mae = create_mae("mae_vit_tiny_patch16", in_chans=source_chans, img_size=32, patch_size=8, depth=1, decoder_depth=1)
    export_encoder(mae.eval(), tmp_path)
    vit = load_timm_encoder(tmp_path, in_chans=in_chans).eval()
    plane = torch.rand(2, 1, 32, 32)
    # an image whose channels are all equal embeds exactly as before
    before = mae.encoder.forward_features(plane.expand(-1, source_chans, -1, -1))
    after = vit.forward_features(plane.expand(-1, in_chans, -1, -1))
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    w = adapt_patch_embed_channels(mae.encoder.patch_embed.proj.weight.detach(), in_chans)
    torch.testing.assert_close(w.sum(1), mae.encoder.patch_embed.proj.weight.detach().sum(1) / in_chans * in_chans)


def test_pretrained_cfg_tells_timm_the_true_input(tiny_export) -> None:
    path, _ = tiny_export
    cfg = timm.data.resolve_model_data_config(load_timm_encoder(path))
    assert cfg["input_size"] == (1, 32, 48) and cfg["mean"] == (0.0,) and cfg["std"] == (1.0,)
    cfg3 = timm.data.resolve_model_data_config(load_timm_encoder(path, in_chans=3, img_size=64))
    assert cfg3["input_size"] == (3, 64, 64) and cfg3["mean"] == (0.0, 0.0, 0.0)


def test_caller_overrides_win_and_forbidden_ones_are_refused(tiny_export) -> None:
    path, _ = tiny_export
    assert load_timm_encoder(path, drop_path_rate=0.1).blocks[1].drop_path1.drop_prob == pytest.approx(0.1)
    with pytest.raises(ValueError, match="checkpoint_path"):
        load_timm_encoder(path, checkpoint_path="/tmp/evil.pth")
    with pytest.raises(ValueError, match="does not match"):
        load_timm_encoder(path, depth=3)


def test_unetr_hidden_states_equal_timm_block_outputs(unetr_export: Path) -> None:
    unetr = build_unetr(unetr_export, out_channels=3).eval()
    assert isinstance(unetr, UNETR)
    vit = load_timm_encoder(unetr_export).eval()
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        out, hidden = unetr.vit(x)
        tokens = vit.norm_pre(vit._pos_embed(vit.patch_embed(x)))
        for i, block in enumerate(vit.blocks):
            tokens = block(tokens)
            torch.testing.assert_close(hidden[i], tokens, rtol=0, atol=1e-5)
        torch.testing.assert_close(out, vit.norm(tokens), rtol=0, atol=1e-5)
        assert unetr(x).shape == (2, 3, 64, 64)


def test_unetr_new_size_random_init_and_refusals(unetr_export: Path, tiny_export) -> None:
    bigger = build_unetr(unetr_export, out_channels=2, img_size=96, in_chans=3)
    assert bigger(torch.rand(1, 3, 96, 96)).shape == (1, 2, 96, 96)
    random = build_unetr(unetr_export, out_channels=2, load_weights=False)
    loaded = build_unetr(unetr_export, out_channels=2)
    assert not torch.equal(random.vit.blocks[0].attn.qkv.weight, loaded.vit.blocks[0].attn.qkv.weight)
    with pytest.raises(ValueError, match="encoder.patch_size"):
        build_unetr(tiny_export[0], out_channels=2)


def test_card_only_rebuild_with_plain_timm(tiny_export) -> None:
    """Another group's script: plain timm + safetensors + the card, no medmae import."""
    path, mae = tiny_export
    script = f"""
import json, sys, timm, torch
from safetensors.torch import load_file
card = json.load(open({str(path / "encoder.json")!r}))
enc = card["encoder"]
vit = timm.create_model(enc["arch"], num_classes=0, in_chans=enc["in_chans"], img_size=enc["img_size"], **enc["kwargs"])
vit.load_state_dict(load_file({str(path)!r} + "/" + card["weights"]), strict=True)
assert "medmae" not in sys.modules
torch.manual_seed(0)
print(float(vit.eval().forward_features(torch.rand(1, 1, 32, 48)).sum()))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    torch.manual_seed(0)
    expected = float(mae.encoder.forward_features(torch.rand(1, 1, 32, 48)).sum())
    assert float(done.stdout.strip()) == pytest.approx(expected, rel=1e-5)


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (lambda c: c["encoder"].pop("arch"), "encoder.arch"),
        (lambda c: c["encoder"].__setitem__("in_chans", "one"), "encoder.in_chans"),
        (lambda c: c["encoder"].__setitem__("img_size", [10**6, 32]), "encoder.img_size"),
        (
            lambda c: c["encoder"]["kwargs"].__setitem__("checkpoint_path", "/tmp/x.pth"),
            "encoder.kwargs.checkpoint_path",
        ),
        (lambda c: c.__setitem__("weights", "../../etc/passwd"), "weights"),
        (lambda c: c.__setitem__("format", 99), "format"),
        (lambda c: c["encoder"].__setitem__("arch", "resnet50"), "encoder.arch"),
    ],
)
def test_bad_cards_fail_with_the_field_named(tiny_export, tmp_path: Path, edit, field: str) -> None:
    export = _copy(tiny_export[0], tmp_path / "e")
    card = json.loads((export / "encoder.json").read_text())
    edit(card)
    (export / "encoder.json").write_text(json.dumps(card))
    with pytest.raises(CardError, match=f"'{field}'"):
        load_timm_encoder(export)


def test_non_finite_weights_and_missing_card_are_refused(tiny_export, tmp_path: Path) -> None:
    export = _copy(tiny_export[0], tmp_path / "e")
    state = load_file(str(export / "encoder.safetensors"))
    state["blocks.0.attn.qkv.weight"][0, 0] = float("nan")
    save_file(state, str(export / "encoder.safetensors"))
    with pytest.raises(CardError, match="blocks.0.attn.qkv.weight"):
        load_timm_encoder(export)
    (export / "encoder.json").unlink()
    with pytest.raises(CardError, match="encoder.json"):
        load_card(export)
