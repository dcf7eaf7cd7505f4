"""finetune-cls end to end on real nibabel / pydicom volumes, its model pieces and its input checks.

The task is real: which acquisition a volume comes from (nibabel's three EPI test runs differ in
matrix, coverage and contrast). Every time point of a run is its own volume (and "patient"); the
last time points are held out, so validation volumes are never seen in training.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom.data
import pytest
import torch

from medmae.data import CacheDataModule
from medmae.export import export_encoder
from medmae.finetune.classify import CKPT_KEY, ClassificationModule, pool_series
from medmae.finetune.cls_cli import finetune_main
from medmae.finetune.cls_data import ClassificationDataModule, read_label_csv
from medmae.models import create_mae

NIB_DATA = Path(nib.__file__).parent / "tests" / "data"
#: (file, label, time points); the last time point of each run (and functional t10) is validation
RUNS = (
    ("example4d.nii.gz", "e4d", (0, 1)),
    ("example_nifti2.nii.gz", "n2", (0, 1)),
    ("functional.nii", "func", (0, 1, 2, 10, 15)),
)
CLASSES = "[e4d, n2, func]"


def write_csv(path: Path, rows: list[dict[str, str]]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


@pytest.fixture(scope="module")
def cls_encoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny exported encoder (3 blocks, 32x32, patch 8) with a real pretraining preprocessing record."""
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("cls_encoder")
    mae = create_mae("mae_vit_tiny_patch16", img_size=32, patch_size=8, embed_dim=64, depth=3, num_heads=2,
                     decoder_depth=1, decoder_embed_dim=32, decoder_num_heads=2)
    record = CacheDataModule(str(out / "no_cache"), img_size=32).preprocessing()
    export_encoder(mae, out / "encoder", preprocessing=record)
    return out / "encoder"


@pytest.fixture(scope="module")
def cls_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Label CSV of real EPI volumes (one per time point), relative image paths, explicit splits."""
    d = tmp_path_factory.mktemp("cls_cases")
    rows = []
    for src, label, times in RUNS:
        img = nib.load(str(NIB_DATA / src))
        data = np.asarray(img.dataobj, dtype=np.float32)
        for k, t in enumerate(times):
            name = f"{label}_t{t}"
            nib.save(nib.Nifti1Image(data[..., t], img.affine), str(d / f"{name}.nii.gz"))
            split = "val" if k == len(times) - 1 or t == 10 else "train"
            rows.append({"image": f"{name}.nii.gz", "label": label, "patient": name, "split": split})
    return write_csv(d / "labels.csv", rows)


def _run(tmp: Path, encoder: Path, labels: Path, steps: int, *extra: str, init: str = "medmae") -> None:
    finetune_main([
        "--config", "configs/finetune/cls_tiny_cpu.yaml",
        "--model.init", f"{init}:{encoder}", "--data.csv", str(labels),
        "--model.task", "multiclass", "--model.classes", CLASSES, "--model.lr", "3e-3", "--model.warmup_steps", "3",
        "--data.batch_size", "16", "--data.samples_per_epoch", "160",
        "--trainer.max_steps", str(steps), "--trainer.default_root_dir", str(tmp),
        "--trainer.logger.init_args.save_dir", str(tmp / "runs"), "--trainer.enable_progress_bar", "false",
        "--trainer.callbacks.init_args.dirpath", str(tmp / "ckpt"), *extra,
    ])


def _scalars(run: Path) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = sorted((run / "runs").rglob("events.out.tfevents.*"))
    acc = EventAccumulator(str(events[-1].parent))
    acc.Reload()
    return {tag: [s.value for s in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_finetune_cls_improves_series_auroc_and_accuracy(tmp_path: Path, cls_encoder: Path, cls_csv: Path) -> None:
    before = tmp_path / "before"
    _run(before, cls_encoder, cls_csv, 1, "--data.samples_per_epoch", "16")  # one step, then validation
    after = tmp_path / "after"
    _run(after, cls_encoder, cls_csv, 40)
    first, last = _scalars(before), _scalars(after)
    assert last["val/loss"][-1] < first["val/loss"][-1] - 0.2, (first["val/loss"], last["val/loss"])
    assert last["val/acc"][-1] > first["val/acc"][-1]
    assert last["val/acc"][-1] == 1.0 and last["val/auroc"][-1] == 1.0
    # the checkpoint holds what the user typed and what inference needs, never a row of the CSV
    ckpt = torch.load(str(after / "ckpt" / "last.ckpt"), map_location="cpu", weights_only=True)
    meta = ckpt[CKPT_KEY]
    assert meta["init"] == f"medmae:{cls_encoder.name}" and meta["classes"] == ["e4d", "n2", "func"]
    assert meta["preprocessing"]["image_size"] == (32, 32)
    text = json.dumps({k: v for k, v in ckpt.items() if k != "state_dict" and k != "optimizer_states"}, default=str)
    for row in read_label_csv(cls_csv, "multiclass", ["e4d", "n2", "func"]):
        assert Path(row.image).name not in text and row.patient not in text


def test_series_level_pools_plane_features_before_the_head(tmp_path: Path, cls_encoder: Path, cls_csv: Path) -> None:
    feats = torch.tensor([[1.0, 2.0], [3.0, 4.0], [10.0, 0.0]])
    assert torch.equal(pool_series(feats, torch.tensor([0, 0, 1]), 2), torch.tensor([[2.0, 3.0], [10.0, 0.0]]))
    module = ClassificationModule(f"medmae:{cls_encoder}", task="multiclass", classes=["e4d", "n2", "func"],
                                  level="series").eval()
    dm = ClassificationDataModule(f"medmae:{cls_encoder}", str(cls_csv), "multiclass", ["e4d", "n2", "func"], "series")
    dm.setup()
    planes = dm.val_series[0].images
    with torch.no_grad():
        expected = module.net.vit.head(module.net.features(planes).mean(0, keepdim=True)).softmax(-1)[0]
        batch = next(iter(dm.val_dataloader()))
        pooled = module(batch["image"], batch["series"], 1).softmax(-1)[0]
    assert torch.allclose(module.series_probabilities(planes), expected, atol=1e-6)
    assert torch.allclose(pooled, expected, atol=1e-6)
    # training batches: several series of different lengths, each a few random planes
    batch = next(iter(dm.train_dataloader()))
    assert batch["target"].shape[0] == len(batch["series"].unique())


@pytest.mark.slow
def test_finetune_cls_series_level_improves(tmp_path: Path, cls_encoder: Path, cls_csv: Path) -> None:
    run = tmp_path / "series"
    _run(run, cls_encoder, cls_csv, 40, "--model.level", "series", "--data.batch_size", "4",
         "--data.planes_per_series", "4", "--data.samples_per_epoch", "40")
    scalars = _scalars(run)  # validation every 10 steps
    assert scalars["val/loss"][-1] < 0.7 * scalars["val/loss"][0], scalars["val/loss"]
    assert scalars["val/acc"][-1] >= 0.75


def test_layer_decay_groups_carry_documented_scales(cls_encoder: Path) -> None:
    module = ClassificationModule(f"medmae:{cls_encoder}", layer_decay=0.5)
    depth = module.depth
    scale = {n: g["lr_scale"] for g in module.param_groups() for n in g["names"]}
    assert depth == 3
    assert scale["vit.patch_embed.proj.weight"] == pytest.approx(0.5 ** (depth + 1))
    assert scale["vit.cls_token"] == pytest.approx(0.5 ** (depth + 1))
    for i in range(depth):  # block i is layer i + 1
        assert scale[f"vit.blocks.{i}.attn.qkv.weight"] == pytest.approx(0.5 ** (depth - i))
    assert scale["vit.fc_norm.weight"] == 1.0 and scale["vit.head.weight"] == 1.0
    assert "vit.norm.weight" not in scale  # avg pooling: the encoder's final norm is dropped


def test_linear_probe_trains_only_the_batchnorm_linear_head(tmp_path: Path, cls_encoder: Path, cls_csv: Path) -> None:
    run = tmp_path / "probe"
    _run(run, cls_encoder, cls_csv, 5, "--model.linear_probe", "true", "--model.lr", "1e-2")
    ckpt = torch.load(str(run / "ckpt" / "last.ckpt"), map_location="cpu", weights_only=True)
    trained = {k[len("net.vit."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("net.vit.")}
    fresh = ClassificationModule(f"medmae:{cls_encoder}", task="multiclass", classes=["e4d", "n2", "func"],
                                 linear_probe=True)
    start = fresh.net.vit.state_dict()
    changed = {k for k in start if not torch.equal(start[k], trained[k])}
    assert changed and all(k.startswith("head.") for k in changed), changed
    assert "head.1.weight" in changed  # the linear layer learnt; the BatchNorm tracked statistics
    bn = fresh.net.vit.head[0]
    assert isinstance(bn, torch.nn.BatchNorm1d) and not bn.affine
    trainable = [n for n, p in fresh.named_parameters() if p.requires_grad]
    assert trainable == ["net.vit.head.1.weight", "net.vit.head.1.bias"]
    fresh.train()
    assert not fresh.net.vit.blocks.training and fresh.net.vit.head.training


def test_dicom_series_folders_and_nifti_rows_read_through_the_card(tmp_path: Path, cls_encoder: Path) -> None:
    rows = []
    for name, label in (("CT_small.dcm", "1"), ("MR_small.dcm", "0")):
        folder = tmp_path / "dicom" / name.split(".")[0]
        folder.mkdir(parents=True)
        ds = pydicom.dcmread(pydicom.data.get_testdata_file(name))
        ds.BurnedInAnnotation = "NO"  # MR_small is DERIVED\SECONDARY: prep's rules reject it unless text-free
        ds.save_as(folder / name)
        rows.append({"image": f"dicom/{folder.name}", "label": label, "split": "train"})
    rows.append({"image": str(NIB_DATA / "anatomical.nii"), "label": "0", "split": "val"})
    dm = ClassificationDataModule(f"medmae:{cls_encoder}", str(write_csv(tmp_path / "l.csv", rows)), max_planes=5)
    dm.setup()
    ct, mr = dm.train_series
    assert ct.images.shape == (1, 1, 32, 32) and ct.target.tolist() == [1.0] and mr.target.tolist() == [0.0]
    assert dm.val_series[0].images.shape == (5, 1, 32, 32)  # 25 planes -> 5 evenly spaced
    for s in (ct, mr, *dm.val_series):
        assert 0.0 <= float(s.images.min()) and float(s.images.max()) <= 1.0 and float(s.images.std()) > 0.05


def test_split_is_per_patient_and_deterministic(tmp_path: Path) -> None:
    image = NIB_DATA / "anatomical.nii"
    rows = [{"image": str(image), "label": "1", "patient": f"P{i // 2}"} for i in range(40)]
    path = write_csv(tmp_path / "l.csv", rows)
    a = read_label_csv(path, "binary", ["0", "1"], val_fraction=0.3)
    assert a == read_label_csv(path, "binary", ["0", "1"], val_fraction=0.3)
    for i in range(0, 40, 2):
        assert a[i].split == a[i + 1].split
    assert {r.split for r in a} == {"train", "val"}
    rows[0]["split"], rows[1]["split"] = "train", "val"
    with pytest.raises(ValueError, match=r"row 3: patient is in split 'val' but row 2"):
        read_label_csv(write_csv(tmp_path / "m.csv", rows), "binary", ["0", "1"])


# ----------------------------------------------------------------------------- bad input


def _error(capsys: pytest.CaptureFixture[str], tmp: Path, encoder: Path, labels: Path, *extra: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        _run(tmp, encoder, labels, 1, *extra)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("medmae finetune-cls: error:"), err
    return err[0]


def _variant(cls_csv: Path, tmp: Path, edit) -> Path:  # type: ignore[no-untyped-def]
    with open(cls_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    rows = edit(rows)
    for r in rows:  # keep the images where the CSV now lives
        if not r["image"].startswith("/") and (cls_csv.parent / r["image"]).exists():
            r["image"] = str(cls_csv.parent / r["image"])
    return write_csv(tmp / "labels.csv", rows)


def test_row_pointing_at_nothing_names_row_and_reference(
    capsys, tmp_path: Path, cls_encoder: Path, cls_csv: Path
) -> None:
    def edit(rows):  # type: ignore[no-untyped-def]
        rows[2]["image"] = "missing/scan.nii.gz"
        return rows

    labels = _variant(cls_csv, tmp_path, edit)
    err = _error(capsys, tmp_path, cls_encoder, labels)
    assert f"{labels}: row 4: image 'missing/scan.nii.gz' points at nothing" in err


def test_missing_label_column_is_named(capsys, tmp_path: Path, cls_encoder: Path, cls_csv: Path) -> None:
    labels = _variant(cls_csv, tmp_path, lambda rows: [{k: v for k, v in r.items() if k != "label"} for r in rows])
    err = _error(capsys, tmp_path, cls_encoder, labels)
    assert f"{labels}: missing label column 'label'" in err and "data.label_column" in err


def test_label_outside_declared_classes_is_named(capsys, tmp_path: Path, cls_encoder: Path, cls_csv: Path) -> None:
    def edit(rows):  # type: ignore[no-untyped-def]
        rows[4]["label"] = "fmri"
        return rows

    labels = _variant(cls_csv, tmp_path, edit)
    err = _error(capsys, tmp_path, cls_encoder, labels)
    assert f"{labels}: row 6: column 'label' value 'fmri' is outside the declared classes" in err


@pytest.mark.parametrize("section,field", [("preprocessing", "axis"), ("encoder", "patch_size")])
def test_card_with_a_missing_field_names_card_and_field(
    capsys, tmp_path: Path, cls_encoder: Path, cls_csv: Path, section: str, field: str
) -> None:
    broken = tmp_path / "broken_encoder"
    shutil.copytree(cls_encoder, broken)
    card = json.loads((broken / "encoder.json").read_text())
    del card[section][field]
    (broken / "encoder.json").write_text(json.dumps(card))
    err = _error(capsys, tmp_path, broken, cls_csv)
    assert f"{broken / 'encoder.json'}: field '{section}.{field}' is missing" in err


@pytest.mark.parametrize("task", ["binary", "multilabel"])
def test_binary_and_multilabel_targets_train_and_report_series_metrics(
    tmp_path: Path, cls_encoder: Path, cls_csv: Path, task: str
) -> None:
    def edit(rows):  # type: ignore[no-untyped-def]
        for r in rows:  # binary: is it the `functional` run; multilabel: one 0/1 column per run
            r["label"] = str(int(r["label"] == "func"))
            r["is_e4d"], r["is_func"] = str(int(r["image"].startswith("e4d"))), r["label"]
        return rows

    labels = _variant(cls_csv, tmp_path, edit)
    classes = "[is_e4d, is_func]" if task == "multilabel" else "[0, 1]"
    _run(tmp_path, cls_encoder, labels, 4, "--model.task", task, "--model.classes", classes,
         "--data.samples_per_epoch", "32")
    scalars = _scalars(tmp_path)
    assert len(scalars["val/auroc"]) == 2 and all(0.0 <= v <= 1.0 for v in scalars["val/auroc"] + scalars["val/acc"])
    assert all(np.isfinite(scalars["val/loss"]))
    ckpt = torch.load(str(tmp_path / "ckpt" / "last.ckpt"), map_location="cpu", weights_only=True)
    assert ckpt["state_dict"]["net.vit.head.weight"].shape[0] == (2 if task == "multilabel" else 1)


@pytest.mark.parametrize("config", ["cls_tiny_cpu.yaml", "cls_vit_base.yaml"])
def test_shipped_configs_parse_and_build(monkeypatch: pytest.MonkeyPatch, cls_encoder: Path, cls_csv: Path,
                                         config: str) -> None:
    from medmae.finetune.cls_cli import ClassificationCLI

    # GPU configs are checked on CPU: only the hardware fields are overridden
    monkeypatch.setattr("sys.argv", [
        "medmae finetune-cls", "--config", f"configs/finetune/{config}", "--model.init", f"medmae:{cls_encoder}",
        "--data.csv", str(cls_csv), "--trainer.accelerator", "cpu", "--trainer.precision", "32-true",
        "--trainer.logger", "false",
    ])
    cli = ClassificationCLI(ClassificationModule, ClassificationDataModule, run=False)
    assert cli.model.hparams.layer_decay == 0.75 and cli.model.hparams.drop_path_rate == 0.1
    assert cli.datamodule.init == cli.model.hparams.init and cli.datamodule.task == "binary"


@pytest.mark.parametrize("pool", ["max", "avgmax"])
def test_max_pooling_keeps_a_finding_in_one_patch(cls_encoder: Path, pool: str) -> None:
    """``max`` / ``avgmax``: fc_norm on the per-channel max (or mean of mean and max) over patch tokens, so one
    patch's features reach the head undiluted; the pretrained weights load as for ``avg``."""
    module = ClassificationModule(f"medmae:{cls_encoder}", global_pool=pool)
    vit = module.net.vit.eval()
    x = torch.rand(3, 1, 32, 32)
    with torch.no_grad():
        tokens = vit.forward_features(x)[:, vit.num_prefix_tokens :]
        pooled = tokens.amax(1) if pool == "max" else 0.5 * (tokens.mean(1) + tokens.amax(1))
        torch.testing.assert_close(vit.forward_head(vit.forward_features(x), pre_logits=True), vit.fc_norm(pooled))
    avg = ClassificationModule(f"medmae:{cls_encoder}", global_pool="avg").net.vit
    torch.testing.assert_close(vit.blocks[2].mlp.fc1.weight, avg.blocks[2].mlp.fc1.weight)
