"""finetune-seg / predict-seg end to end on real nibabel brain volumes, and their input checks."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medmae.data import CacheDataModule, SelectionOptions
from medmae.export import export_encoder, preprocessing_from_card
from medmae.finetune.layer_decay import layer_decay_groups
from medmae.finetune.seg_cli import finetune_main, predict_main
from medmae.finetune.segment import SegmentationModule, dice_per_class
from medmae.finetune.volumes import VolumeError, read_label, read_nifti_image
from medmae.models import create_mae

NIB_DATA = Path(nib.__file__).parent / "tests" / "data"


def tissue_labels(data: np.ndarray) -> np.ndarray:
    """Three intensity classes of a real T1 (dark / mid / bright): a structure the model must find."""
    lo, hi = np.percentile(data, [50, 85])
    return ((data > lo).astype(np.uint8) + (data > hi).astype(np.uint8)).astype(np.uint8)


def write_case(src: Path, out_dir: Path, name: str) -> tuple[Path, Path]:
    img = nib.load(str(src))
    data = np.asarray(img.dataobj, dtype=np.float32)
    if data.ndim == 4:
        data = data[..., 0]
    image = out_dir / f"{name}.nii.gz"
    label = out_dir / f"{name}_label.nii.gz"
    nib.save(nib.Nifti1Image(data, img.affine), str(image))
    nib.save(nib.Nifti1Image(tissue_labels(data), img.affine), str(label))
    return image, label


@pytest.fixture(scope="module")
def seg_encoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small patch-16, 10-block encoder (what UNETR takes) with a real pretraining preprocessing record."""
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("seg_encoder")
    mae = create_mae("mae_vit_tiny_patch16", img_size=32, embed_dim=96, num_heads=3, depth=10, decoder_depth=1)
    record = CacheDataModule(str(out / "no_cache"), img_size=32).preprocessing()
    export_encoder(mae, out, preprocessing=record)
    return out


@pytest.fixture(scope="module")
def cases_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("cases")
    rows = []
    for name, src, split in (
        ("anat", NIB_DATA / "anatomical.nii", "train"),
        ("epi", NIB_DATA / "example4d.nii.gz", "train"),
        ("moved", NIB_DATA / "reoriented_anat_moved.nii", "val"),
    ):
        image, label = write_case(src, d, name)
        rows.append({"image": image.name, "label": label.name, "patient": name, "split": split})
    path = d / "cases.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def _fit(tmp: Path, encoder: Path, cases: Path, init: str, steps: int, extra: tuple[str, ...] = ()) -> None:
    """One finetune-seg run through the real CLI entry (the tiny CPU config, small budgets)."""
    finetune_main(
        [
            "--config",
            "configs/finetune/seg_tiny_cpu.yaml",
            "--model.init",
            f"{init}:{encoder}",
            "--model.num_classes",
            "3",
            "--model.feature_size",
            "8",
            "--model.lr",
            "3e-3",
            "--model.warmup_steps",
            "5",
            "--data.csv",
            str(cases),
            "--data.batch_size",
            "8",
            "--data.samples_per_epoch",
            str(8 * steps),  # one epoch: validated at its end
            "--trainer.max_steps",
            str(steps),
            "--trainer.default_root_dir",
            str(tmp),
            "--trainer.logger.init_args.save_dir",
            str(tmp / "runs"),
            "--trainer.enable_progress_bar",
            "false",
            "--trainer.callbacks.init_args.dirpath",
            str(tmp / "ckpt"),
            *extra,
        ]
    )


def test_finetune_seg_improves_dice_and_predict_writes_masks_on_the_input_grid(
    tmp_path: Path, seg_encoder: Path, cases_csv: Path
) -> None:
    before = tmp_path / "before"
    unetr = ("--model.decoder", "unetr")  # MONAI UNETR end to end (the light decoder: the next test)
    _fit(before, seg_encoder, cases_csv, "medmae", 1, unetr)
    after = tmp_path / "after"
    _fit(after, seg_encoder, cases_csv, "medmae", 40, unetr)
    first = _val_dice(before)
    last = _val_dice(after)
    assert last > first + 0.1, (first, last)
    # predict-seg: the mask has the input's voxel order and affine, and agrees with the labels
    out = tmp_path / "masks"
    image = cases_csv.parent / "moved.nii.gz"
    assert predict_main([str(after / "ckpt" / "last.ckpt"), str(image), "--out", str(out)]) == 0
    mask = nib.load(str(out / "moved_seg.nii.gz"))
    src = nib.load(str(image))
    assert mask.shape == src.shape and np.allclose(mask.affine, src.affine)
    truth = np.asarray(nib.load(str(cases_csv.parent / "moved_label.nii.gz")).dataobj)
    assert np.mean(dice_per_class(np.asarray(mask.dataobj), truth, 3)) == pytest.approx(last, abs=0.02)


def test_light_decoder_fine_tunes_the_demo_sized_encoder(tmp_path: Path, cases_csv: Path) -> None:
    """Patch 8, 4 blocks (UNETR cannot carry it): the light decoder trains and its Dice improves."""
    encoder = tmp_path / "demo_encoder"
    mae = create_mae("mae_vit_tiny_patch16", img_size=32, patch_size=8, depth=4, decoder_depth=1)
    export_encoder(mae, encoder, preprocessing=CacheDataModule(str(tmp_path / "c"), img_size=32).preprocessing())
    with pytest.raises(SystemExit):  # UNETR names the field it cannot take
        _fit(tmp_path / "unetr", encoder, cases_csv, "medmae", 1, ("--model.decoder", "unetr"))
    _fit(tmp_path / "before", encoder, cases_csv, "medmae", 1, ("--model.decoder", "light"))
    _fit(tmp_path / "after", encoder, cases_csv, "medmae", 40, ("--model.decoder", "light"))
    assert _val_dice(tmp_path / "after") > _val_dice(tmp_path / "before") + 0.1


def test_light_decoder_taps_match_unetr_for_twelve_blocks() -> None:
    from medmae.finetune.light_decoder import tap_blocks

    assert tap_blocks(12, 4) == [9, 6, 3]  # MONAI UNETR's hidden states 9, 6, 3 for patch 16
    assert tap_blocks(4, 3) == [3, 1] and tap_blocks(1, 1) == []


def _val_dice(run: Path) -> float:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = sorted((run / "runs").rglob("events.out.tfevents.*"))
    acc = EventAccumulator(str(events[-1].parent))
    acc.Reload()
    return acc.Scalars("val/dice")[-1].value


def test_layer_decay_groups_carry_documented_scales(seg_encoder: Path) -> None:
    module = SegmentationModule(f"medmae:{seg_encoder}", num_classes=3, feature_size=8, layer_decay=0.5)
    groups = layer_decay_groups(
        module.net.named_parameters(), depth=10, layer_decay=0.5, weight_decay=0.05, encoder_prefix="model.vit."
    )
    scale = {n: g["lr_scale"] for g in groups for n in g["names"]}
    assert scale["model.vit.patch_embedding.patch_embeddings.weight"] == 0.5**11
    assert scale["model.vit.blocks.0.attn.qkv.weight"] == 0.5**10
    assert scale["model.vit.blocks.9.mlp.linear1.weight"] == 0.5**1
    assert scale["model.vit.norm.weight"] == 1.0 and scale["model.out.conv.conv.weight"] == 1.0
    decay = {n: g["weight_decay"] for g in groups for n in g["names"]}
    assert decay["model.vit.blocks.0.norm1.weight"] == 0.0 and decay["model.vit.blocks.0.attn.qkv.weight"] == 0.05


def test_random_init_is_the_same_model_without_the_weights(seg_encoder: Path) -> None:
    pre = SegmentationModule(f"medmae:{seg_encoder}", num_classes=3, feature_size=8)
    rnd = SegmentationModule(f"random:{seg_encoder}", num_classes=3, feature_size=8)
    assert [n for n, _ in pre.named_parameters()] == [n for n, _ in rnd.named_parameters()]
    assert not torch.equal(pre.net.model.vit.blocks[3].attn.qkv.weight, rnd.net.model.vit.blocks[3].attn.qkv.weight)


@pytest.mark.parametrize(("crop", "size"), [((32, 32), (16, 16)), ((30, 40), (20, 15)), ((30, 40), (40, 30))])
def test_card_preprocessing_matches_pretraining(tmp_path: Path, crop: tuple[int, int], size: tuple[int, int]) -> None:
    """The card-rebuilt input equals pretraining's validation view (``CacheSliceDataset``) plane by plane, on real
    square and non-square planes whose aspect the output keeps (there pretraining's centre crop and fine-tuning's
    pad are both the identity; for other aspects they differ by design, see medmae.export.preprocessing)."""
    from data_prep import prep_archive
    from medmae.data.dataset import CacheSliceDataset

    src = nib.load(str(NIB_DATA / "anatomical.nii"))
    data = np.asarray(src.dataobj, dtype=np.float32)[: crop[0], : crop[1], :]
    archive = tmp_path / "archive"
    archive.mkdir()
    nib.save(nib.Nifti1Image(data, src.affine), str(archive / "anat.nii.gz"))
    cache = tmp_path / "cache"
    prep_archive([archive], cache, workers=1, val_fraction=0.0, progress=False)
    dm = CacheDataModule(str(cache), img_size=size, slices=3, num_workers=0,
                         selection=SelectionOptions(min_size=8, max_anisotropy=10.0))
    dm.setup("fit")
    pretraining = CacheSliceDataset(cache, dm.train_dataset.index, dm.transform, random_crop=False)
    pre = preprocessing_from_card({"preprocessing": dm.preprocessing()})
    vol = read_nifti_image(archive / "anat.nii.gz")
    x = pre.planes(vol.array, vol.intensity, vol.stats, spacing=vol.spacing)
    assert x.shape == (vol.shape[0], 3, *size) and len(pretraining) == vol.shape[0]
    for k in range(len(pretraining)):
        item = pretraining[k]
        torch.testing.assert_close(x[item["slice"]], item["image"], atol=1e-6, rtol=0)


def test_bad_inputs_name_the_file(tmp_path: Path, seg_encoder: Path, cases_csv: Path, capsys) -> None:
    image = cases_csv.parent / "anat.nii.gz"
    vol = read_nifti_image(image)
    # label with another geometry
    other = cases_csv.parent / "epi_label.nii.gz"
    with pytest.raises(VolumeError, match="epi_label.nii.gz: label geometry differs"):
        read_label(other, vol, 3)
    # label values outside the declared classes
    bad = tmp_path / "bad_label.nii.gz"
    src = nib.load(str(image))
    nib.save(nib.Nifti1Image(np.full(src.shape, 7, np.uint8), src.affine), str(bad))
    with pytest.raises(VolumeError, match=r"bad_label.nii.gz: label values \[7\] are outside the declared classes"):
        read_label(bad, vol, 3)
    # a CSV row pointing at nothing: one line, exit 2, file + row named
    rows = tmp_path / "rows.csv"
    rows.write_text(f"image,label\n{image},{cases_csv.parent / 'anat_label.nii.gz'}\nmissing.nii.gz,{bad}\n")
    with pytest.raises(SystemExit) as done:
        _fit(tmp_path / "run", seg_encoder, rows, "medmae", 1)
    assert done.value.code == 2
    err = capsys.readouterr().err
    assert "row 3: image 'missing.nii.gz' points at nothing" in err and "Traceback" not in err
    # a card with a missing field
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in seg_encoder.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    card = json.loads((broken / "encoder.json").read_text())
    del card["preprocessing"]["axis"]
    (broken / "encoder.json").write_text(json.dumps(card))
    with pytest.raises(SystemExit):
        _fit(tmp_path / "run2", broken, cases_csv, "medmae", 1)
    assert "preprocessing.axis" in capsys.readouterr().err
    # a data.augment value out of range: one line naming the key, before any volume is read
    with pytest.raises(SystemExit) as done:
        _fit(tmp_path / "run3", seg_encoder, cases_csv, "medmae", 1, ("--data.augment.rotate_deg", "500"))
    err = capsys.readouterr().err
    assert done.value.code == 2 and "data.augment.rotate_deg must be in [0, 180], got 500" in err, err
    assert "Traceback" not in err


def test_timm_init_uses_only_the_local_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """timm:NAME loads weights from the local Hugging Face cache; an empty cache is a clear error, no download."""
    import huggingface_hub.constants as hub
    import timm
    from safetensors.torch import save_file

    from medmae.finetune.encoders import parse_init, resolve_encoder
    from medmae.finetune.segment import build_segmenter

    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ValueError, match="not available offline"):
        resolve_encoder(parse_init("timm:vit_tiny_patch16_224"))
    reference = timm.create_model("vit_tiny_patch16_224", pretrained=False)
    repo = tmp_path / "models--timm--vit_tiny_patch16_224.augreg_in21k_ft_in1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(snapshot / "model.safetensors"))
    source = resolve_encoder(parse_init("timm:vit_tiny_patch16_224"))
    folded = reference.patch_embed.proj.weight.detach().sum(1, keepdim=True)  # 3 RGB filters -> 1 channel
    torch.testing.assert_close(source.state["patch_embed.proj.weight"], folded)
    net = build_segmenter(source, num_classes=2, feature_size=8)
    assert net(torch.rand(1, 1, 224, 224)).shape == (1, 2, 224, 224)


SEG_CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs" / "finetune").glob("seg_*.yaml"))


@pytest.mark.parametrize("config", SEG_CONFIGS, ids=[c.name for c in SEG_CONFIGS])
def test_seg_configs_instantiate(
    config: Path, seg_encoder: Path, cases_csv: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys

    from medmae.finetune.seg_cli import SegmentationCLI
    from medmae.finetune.seg_data import SegmentationDataModule

    monkeypatch.setattr(
        sys,
        "argv",
        [
            "medmae",
            "--config",
            str(config),
            "--model.init",
            f"medmae:{seg_encoder}",
            "--data.csv",
            str(cases_csv),
            "--trainer.accelerator",
            "cpu",
            "--trainer.devices",
            "1",
            "--trainer.precision",
            "32-true",
            "--trainer.logger",
            "false",
            "--data.augment.rotate_deg",
            "10",
        ],
    )
    cli = SegmentationCLI(SegmentationModule, SegmentationDataModule, run=False, seed_everything_default=0)
    assert cli.datamodule.init == cli.model.hparams.init and cli.datamodule.num_classes == cli.model.hparams.num_classes
    # data.augment is the pretraining section's dataclass, given key by key as in a pretraining config
    assert cli.datamodule.augment.rotate_deg == 10.0 and cli.datamodule.augment.gamma == (1.0, 1.0)
