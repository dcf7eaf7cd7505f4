"""finetune-seg / predict-seg with a 3D export: MONAI UNETR 3D, random patches, sliding-window Dice."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from medmae.data.intensity import IntensityRule
from medmae.data.volume import VolumeOptions, VolumeTransform
from medmae.export import export_encoder, load_card, preprocessing_from_card
from medmae.export.unetr import EncoderUNETR
from medmae.finetune.layer_decay import layer_decay_groups
from medmae.finetune.seg_cli import finetune_main, predict_main
from medmae.finetune.seg_data3d import PatchDataset, prepare_volume_case
from medmae.finetune.segment import SegmentationModule, dice_per_class
from medmae.models import MaskedAutoencoder3D

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "finetune" / "seg3d_tiny_cpu.yaml"
#: the encoder's crop and the card's grid: 16 x 32 x 32 voxels at 2 x 1.25 x 1.25 mm
SIZE, SPACING = (16, 32, 32), (2.0, 1.25, 1.25)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def encoder3d(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny patch-16, 10-block 3D encoder (what UNETR 3D takes) with a 3D pretraining record."""
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("encoder3d")
    mae = MaskedAutoencoder3D(
        img_size=SIZE, patch_size=16, embed_dim=48, depth=10, num_heads=4,
        decoder_embed_dim=24, decoder_depth=1, decoder_num_heads=2,
    )  # fmt: skip
    record = VolumeTransform(VolumeOptions(size=SIZE, spacing_mm=SPACING), IntensityRule.checked()).describe()
    export_encoder(mae, out, preprocessing=record)
    return out


def write_cube_case(folder: Path, name: str, seed: int) -> tuple[Path, Path]:
    """A 40 x 40 x 24 (x, y, z) NIfTI at 1 x 1 x 2 mm: noise with a bright box labelled 1."""
    rng = np.random.default_rng(seed)
    data = rng.normal(100.0, 10.0, (40, 40, 24)).astype(np.float32)
    label = np.zeros(data.shape, np.uint8)
    x0, y0, z0 = rng.integers(6, 20), rng.integers(6, 20), rng.integers(4, 12)
    label[x0 : x0 + 13, y0 : y0 + 12, z0 : z0 + 7] = 1
    data[label == 1] += 200.0
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    affine[:3, 3] = (-20.0, -30.0, 5.0)
    image_path, label_path = folder / f"{name}.nii.gz", folder / f"{name}_label.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), str(image_path))
    nib.save(nib.Nifti1Image(label, affine), str(label_path))
    return image_path, label_path


@pytest.fixture(scope="module")
def cases3d(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("cases3d")
    rows = []
    for i, split in enumerate(("train", "train", "val")):
        image, label = write_cube_case(folder, f"case{i}", i)
        rows.append({"image": image.name, "label": label.name, "patient": f"p{i}", "split": split})
    path = folder / "cases.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def _fit(run: Path, init: str, cases: Path, steps: int, *extra: str) -> None:
    finetune_main(
        [
            "--config", str(CONFIG),
            "--model.init", init,
            "--model.num_classes", "2",
            "--model.lr", "3e-3",
            "--model.warmup_steps", "3",
            "--data.csv", str(cases),
            "--data.batch_size", "2",
            "--data.samples_per_epoch", "10",  # 5 steps per epoch, whole-volume validation after each
            "--trainer.max_steps", str(steps),
            "--trainer.default_root_dir", str(run),
            "--trainer.logger.init_args.save_dir", str(run / "runs"),
            "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false",
            "--trainer.callbacks.init_args.dirpath", str(run / "ckpt"),
            *extra,
        ]
    )  # fmt: skip


def _val_dice(run: Path) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = sorted((run / "runs").rglob("events.out.tfevents.*"))
    acc = EventAccumulator(str(events[-1].parent))
    acc.Reload()
    return [s.value for s in acc.Scalars("val/dice")]


def test_finetune_seg_3d_improves_dice_and_predict_writes_a_mask_on_the_input_grid(
    tmp_path: Path, encoder3d: Path, cases3d: Path
) -> None:
    before = tmp_path / "before"
    _fit(before, f"medmae:{encoder3d}", cases3d, 1, "--data.samples_per_epoch", "2")  # validated after 1 step
    run = tmp_path / "run"
    _fit(run, f"medmae:{encoder3d}", cases3d, 40)
    first, dice = _val_dice(before), _val_dice(run)
    assert len(first) == 1 and len(dice) == 8, (first, dice)
    assert dice[-1] > first[0] + 0.3 and dice[-1] > dice[0] and dice[-1] > 0.8, (first, dice)
    out = tmp_path / "masks"
    image = cases3d.parent / "case2.nii.gz"
    assert predict_main([str(run / "ckpt" / "last.ckpt"), str(image), "--out", str(out), "--batch", "2"]) == 0
    mask, src = nib.load(str(out / "case2_seg.nii.gz")), nib.load(str(image))
    assert mask.shape == src.shape and np.allclose(mask.affine, src.affine)
    truth = np.asarray(nib.load(str(cases3d.parent / "case2_label.nii.gz")).dataobj)
    assert dice_per_class(np.asarray(mask.dataobj), truth, 2)[0] == pytest.approx(dice[-1], abs=0.02)


def test_3d_init_builds_unetr3d_and_random_is_the_same_network(encoder3d: Path) -> None:
    pre = SegmentationModule(f"medmae:{encoder3d}", num_classes=2, feature_size=8)
    rnd = SegmentationModule(f"random:{encoder3d}", num_classes=2, feature_size=8)
    assert (
        isinstance(pre.net.model, EncoderUNETR) and pre.net.model.vit.patch_embedding.patch_embeddings.weight.ndim == 5
    )
    assert [(n, p.shape) for n, p in pre.named_parameters()] == [(n, p.shape) for n, p in rnd.named_parameters()]
    assert not torch.equal(pre.net.model.vit.blocks[3].attn.qkv.weight, rnd.net.model.vit.blocks[3].attn.qkv.weight)
    with torch.no_grad():
        assert pre(torch.rand(1, 1, *SIZE)).shape == (1, 2, *SIZE)
    # the same layer-wise lr decay as 2D, over MONAI's 3D ViT names
    groups = layer_decay_groups(
        pre.net.named_parameters(), depth=10, layer_decay=0.5, weight_decay=0.05, encoder_prefix="model.vit."
    )
    scale = {n: g["lr_scale"] for g in groups for n in g["names"]}
    assert scale["model.vit.patch_embedding.patch_embeddings.weight"] == 0.5**11
    assert scale["model.vit.blocks.9.mlp.linear1.weight"] == 0.5 and scale["model.out.conv.conv.weight"] == 1.0
    from medmae.export import CardError
    from medmae.finetune.classify import ClassificationModule

    with pytest.raises(CardError, match="a 3D encoder; finetune-cls .* takes 2D encoders only"):
        ClassificationModule(f"medmae:{encoder3d}")


def test_3d_light_decoder_carries_the_encoder_and_its_starts_differ_as_in_2d(encoder3d: Path) -> None:
    """``decoder: light`` in 3D: medmae's own encoder (no key map) with a LayerNorm per tap, and the three
    starts as in 2D: pretrained weights + sin-cos; random weights + learnable random positions; the same
    random weights + the pretrained positions."""
    mae = MaskedAutoencoder3D(img_size=SIZE, patch_size=16, embed_dim=48, depth=10, num_heads=4,
                              decoder_embed_dim=24, decoder_depth=1, decoder_num_heads=2)  # fmt: skip
    mae.encoder.load_state_dict(load_file(str(encoder3d / "encoder.safetensors")))  # what was exported
    starts = {}
    for init in ("medmae", "random", "random-sincos"):
        torch.manual_seed(0)
        starts[init] = SegmentationModule(f"{init}:{encoder3d}", num_classes=2, decoder="light", feature_size=8)
    pre, rnd, sincos = (starts[k].net.model.encoder for k in ("medmae", "random", "random-sincos"))
    x = torch.rand(2, 1, *SIZE)
    with torch.no_grad():
        torch.testing.assert_close(pre(x), mae.encoder(x), rtol=0, atol=1e-5)  # the exported encoder, as is
        assert starts["medmae"](x).shape == (2, 2, *SIZE)
    assert torch.equal(sincos.pos_embed, pre.pos_embed) and not torch.equal(rnd.pos_embed, pre.pos_embed)
    assert float(rnd.pos_embed.std()) == pytest.approx(0.02, rel=0.2)  # timm's learnable random positions
    assert torch.equal(sincos.blocks[3].attn.qkv.weight, rnd.blocks[3].attn.qkv.weight)  # same random weights
    assert not torch.equal(pre.blocks[3].attn.qkv.weight, rnd.blocks[3].attn.qkv.weight)
    names = [n for n, _ in starts["medmae"].net.named_parameters()]
    assert any("tap_norms" in n for n in names) and "model.encoder.pos_embed" in names
    scale = {n: g["lr_scale"] for g in starts["medmae"]._groups() for n in g["names"]}
    assert scale["model.encoder.pos_embed"] == 0.75**11 and scale["model.encoder.blocks.9.attn.qkv.weight"] == 0.75
    with pytest.raises(ValueError, match="dropout_rate is for the 3D UNETR"):
        SegmentationModule(f"medmae:{encoder3d}", num_classes=2, decoder="light", dropout_rate=0.1)


def test_patches_hold_foreground_follow_the_card_grid_and_repeat_per_seed(encoder3d: Path, cases3d: Path) -> None:
    pre = preprocessing_from_card(load_card(encoder3d))
    folder = cases3d.parent
    case = prepare_volume_case(str(folder / "case0.nii.gz"), str(folder / "case0_label.nii.gz"), pre, 2, "OT", None)
    assert case.image.shape == (1, 24, 32, 32) and case.grid_labels.shape == (24, 32, 32)  # 24x40x40 at 2x1x1 mm
    assert case.label.shape == case.shape == (24, 40, 40) and case.spacing == (2.0, 1.0, 1.0)
    # the bright box is where the labels are, on the card's grid
    inside = case.image[0][case.grid_labels.bool()]
    outside = case.image[0][~case.grid_labels.bool()]
    assert float(inside.min()) > float(outside.max())
    data = PatchDataset([case], 6, pre.size, (0.5, 1.0), 0.5, 1.0, seed=0)
    items = [data[i] for i in range(6)]
    assert all(it["image"].shape == (1, *SIZE) and it["label"].shape == (1, *SIZE) for it in items)
    assert all(bool(it["label"].any()) for it in items)  # foreground_prob 1
    torch.testing.assert_close(data[3]["image"], items[3]["image"])  # a pure function of (seed, epoch, index)
    data.epoch = 1
    assert not torch.equal(data[3]["image"], items[3]["image"])


def test_bad_3d_inputs_name_the_file_or_field(
    tmp_path: Path, encoder3d: Path, cases3d: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = cases3d.parent
    # a label on another grid
    rows = tmp_path / "rows.csv"
    src = nib.load(str(folder / "case1_label.nii.gz"))
    nib.save(nib.Nifti1Image(np.asarray(src.dataobj)[:, :, :20], src.affine), str(tmp_path / "short_label.nii.gz"))
    rows.write_text(f"image,label,split\n{folder / 'case0.nii.gz'},{tmp_path / 'short_label.nii.gz'},train\n")
    with pytest.raises(SystemExit) as done:
        _fit(tmp_path / "run", f"medmae:{encoder3d}", rows, 1)
    err = capsys.readouterr().err
    assert done.value.code == 2 and "short_label.nii.gz: label geometry differs from image case0.nii.gz" in err
    assert "Traceback" not in err
    # a card whose 3D preprocessing lacks a field
    broken = tmp_path / "broken"
    shutil.copytree(encoder3d, broken)
    card = json.loads((broken / "encoder.json").read_text())
    del card["preprocessing"]["volume"]["spacing_mm"]
    (broken / "encoder.json").write_text(json.dumps(card))
    with pytest.raises(SystemExit):
        _fit(tmp_path / "run2", f"medmae:{broken}", cases3d, 1)
    err = capsys.readouterr().err
    assert "broken/encoder.json: field 'preprocessing.volume.spacing_mm' is missing" in err and "Traceback" not in err
    # windows that UNETR 3D cannot take
    card["preprocessing"]["volume"]["spacing_mm"] = list(SPACING)
    card["preprocessing"]["volume"]["size"] = [16, 32, 24]
    (broken / "encoder.json").write_text(json.dumps(card))
    with pytest.raises(ValueError, match=r"field 'preprocessing.volume.size' is \[16, 32, 24\]; UNETR 3D"):
        SegmentationModule(f"medmae:{broken}", num_classes=2)
    # the light decoder has no dropout in 3D: one line naming the key
    with pytest.raises(SystemExit):
        _fit(tmp_path / "run3", f"medmae:{encoder3d}", cases3d, 1, "--model.decoder", "light",
             "--model.dropout_rate", "0.1")  # fmt: skip
    err = capsys.readouterr().err
    assert "model.dropout_rate is for the 3D UNETR" in err and "Traceback" not in err
    # data.augment turns planes: a 3D encoder refuses it by name
    with pytest.raises(SystemExit):
        _fit(tmp_path / "run4", f"medmae:{encoder3d}", cases3d, 1, "--data.augment.rotate_deg", "10")
    err = capsys.readouterr().err
    assert "data.augment is 2D only" in err and "Traceback" not in err


def test_3d_light_decoder_fine_tunes_and_predicts_through_the_commands(
    tmp_path: Path, encoder3d: Path, cases3d: Path
) -> None:
    run = tmp_path / "light"
    _fit(run, f"medmae:{encoder3d}", cases3d, 5, "--model.decoder", "light")
    assert (run / "ckpt" / "last.ckpt").is_file() and len(_val_dice(run)) == 1
    out, image = tmp_path / "masks", cases3d.parent / "case2.nii.gz"
    assert predict_main([str(run / "ckpt" / "last.ckpt"), str(image), "--out", str(out), "--batch", "2"]) == 0
    mask = nib.load(str(out / "case2_seg.nii.gz"))
    assert mask.shape == nib.load(str(image)).shape and set(np.unique(np.asarray(mask.dataobj))) <= {0, 1}


SEG3D_CONFIGS = sorted((REPO / "configs" / "finetune").glob("seg3d_*.yaml"))


@pytest.mark.parametrize("config", SEG3D_CONFIGS, ids=[c.name for c in SEG3D_CONFIGS])
def test_seg3d_configs_instantiate(
    config: Path, encoder3d: Path, cases3d: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys

    from medmae.finetune.seg_cli import SegmentationCLI
    from medmae.finetune.seg_data import SegmentationDataModule

    argv = ["medmae", "--config", str(config), "--model.init", f"medmae:{encoder3d}", "--data.csv", str(cases3d),
            "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.precision", "32-true",
            "--trainer.logger", "false"]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    cli = SegmentationCLI(SegmentationModule, SegmentationDataModule, run=False, seed_everything_default=0)
    assert cli.model.hparams.decoder == "unetr" and isinstance(cli.model.net.model, EncoderUNETR)
    assert cli.datamodule.init == cli.model.hparams.init
