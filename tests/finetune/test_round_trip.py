"""A CT NIfTI with a dcm2niix sidecar through every user command: prep -> fit -> export -> finetune-seg ->
predict-seg with default flags. The encoder sees at prediction exactly what it saw in pretraining.

Before issue 16 fine-tuning and prediction ignored the sidecar and read the CT as ``OT``
(percentile-scaled), while prep stored and windowed it in HU: the same voxel reached the encoder as
0.955 after fine-tuning and 0.528 in pretraining.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pydicom.data
import pytest
import torch

from medmae.cli import main as medmae_main
from medmae.data import CacheDataModule, IntensityOptions, SelectionOptions
from medmae.data.cache import load_manifest
from medmae.data.dataset import CacheSliceDataset
from medmae.finetune.seg_cli import encoder_input
from medmae.finetune.segment import CKPT_KEY, load_segmenter
from medmae.finetune.volumes import prediction_modality, read_image

REPO = Path(__file__).resolve().parents[2]
WINDOW = "[[40, 400]]"  # one CT window: pretraining's per-sample window draw is then fixed


def real_ct_volume(n_slices: int, shift: int) -> np.ndarray:
    """HU slices of pydicom's real CT_small (a 128^2 abdomen slice), shifted per slice: (X, Y, Z) int16."""
    ds = pydicom.dcmread(pydicom.data.get_testdata_file("CT_small.dcm"))
    hu = (ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)).astype(np.int16)
    planes = [np.roll(hu, shift * k, axis=1) for k in range(n_slices)]
    return np.ascontiguousarray(np.stack(planes, axis=-1).transpose(1, 0, 2))


def write_ct(folder: Path, name: str, n_slices: int, shift: int) -> tuple[Path, Path]:
    """``name.nii.gz`` + its dcm2niix sidecar (``Modality: CT``) + a body label (HU > -300)."""
    folder.mkdir(parents=True, exist_ok=True)
    data = real_ct_volume(n_slices, shift)
    affine = np.diag([0.7, 0.7, 2.5, 1.0])
    image = folder / f"{name}.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), str(image))
    (folder / f"{name}.json").write_text(json.dumps({"Modality": "CT", "ImageType": ["ORIGINAL", "PRIMARY"]}))
    label = folder.parent / "labels" / f"{name}_label.nii.gz"
    label.parent.mkdir(exist_ok=True)
    nib.save(nib.Nifti1Image((data > -300).astype(np.uint8), affine), str(label))
    return image, label


@pytest.fixture(scope="module")
def trip(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("round_trip")
    archive = root / "archive"
    train_image, train_label = write_ct(archive, "ct_a", 6, 3)
    val_image, val_label = write_ct(archive, "ct_b", 8, -2)
    cache = root / "cache"
    prep = ["prep", str(archive), "--out", str(cache), "--workers", "1", "--val-fraction", "0", "--quiet"]
    assert medmae_main(prep) == 0
    fit = [
        "fit", "--config", str(REPO / "configs/pretrain/tiny_cpu.yaml"), "--data.cache_dir", str(cache),
        "--model.img_size", "[32, 32]", "--data.img_size", "[32, 32]", "--data.intensity.ct_windows", WINDOW,
        "--data.num_workers", "0", "--data.batch_size", "4", "--data.selection.min_size", "16",
        "--trainer.max_steps", "3",
        "--trainer.logger.init_args.save_dir", str(root / "runs"), "--trainer.enable_progress_bar", "false",
    ]  # fmt: skip
    assert medmae_main(fit) == 0
    (ckpt,) = (root / "runs").rglob("last.ckpt")
    encoder = root / "encoder"
    assert medmae_main(["export", str(ckpt), "--out", str(encoder)]) == 0
    cases = root / "cases.csv"
    with open(cases, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "label", "split"])
        w.writerow([train_image, train_label, "train"])
        w.writerow([val_image, val_label, "val"])
    finetune = [
        "finetune-seg", "--config", str(REPO / "configs/finetune/seg_tiny_cpu.yaml"),
        "--model.init", f"medmae:{encoder}", "--model.feature_size", "8", "--data.csv", str(cases),
        "--data.batch_size", "4", "--data.samples_per_epoch", "12", "--trainer.max_steps", "3",
        "--trainer.default_root_dir", str(root), "--trainer.logger.init_args.save_dir", str(root / "seg_runs"),
        "--trainer.enable_progress_bar", "false", "--trainer.callbacks.init_args.dirpath", str(root / "seg_ckpt"),
    ]  # fmt: skip
    assert medmae_main(finetune) == 0
    masks = root / "masks"
    assert medmae_main(["predict-seg", str(root / "seg_ckpt" / "last.ckpt"), str(val_image), "--out", str(masks)]) == 0
    return {"root": root, "cache": cache, "val_image": val_image, "val_label": val_label, "masks": masks,
            "seg_ckpt": root / "seg_ckpt" / "last.ckpt"}  # fmt: skip


def test_prediction_input_equals_the_pretraining_input_for_the_same_voxels(trip: dict[str, Path]) -> None:
    rows = load_manifest(trip["cache"]).rows
    assert {(r.modality, r.intensity, r.modality_source) for r in rows} == {("CT", "HU", "sidecar")}
    # what predict-seg feeds the encoder with default flags (the checkpoint's rule, the card's preprocessing)
    model = load_segmenter(trip["seg_ckpt"])
    ref = str(trip["val_image"])
    volume = read_image(ref, modality=prediction_modality(ref, model.nifti_modality, None))
    assert (volume.modality, volume.modality_source, volume.intensity) == ("CT", "sidecar", "HU")
    predicted = encoder_input(model.preprocessing, volume)
    # what pretraining fed the encoder for the same series: its validation view (centre crop, no flip)
    dm = CacheDataModule(str(trip["cache"]), img_size=32, intensity=IntensityOptions(ct_windows=[(40.0, 400.0)]),
                         selection=SelectionOptions(min_size=16), num_workers=0)
    dm.setup("fit")
    # prep's keyed split decides (with this run's fresh salt) whether the 8-slice series is train or val
    (index,) = [
        ds.index
        for ds in (dm.train_dataset, dm.val_dataset)
        if ds is not None and volume.shape[0] in [int(n) for n in ds.index.n_slices]
    ]
    pretraining = CacheSliceDataset(trip["cache"], index, dm.transform, random_crop=False)
    series = next(s for s in range(index.num_series) if int(index.n_slices[s]) == volume.shape[0])
    compared = 0
    for k in range(len(pretraining)):
        item = pretraining[k]
        if item["series"] == series:
            torch.testing.assert_close(predicted[item["slice"]], item["image"], atol=1e-6, rtol=0)
            compared += 1
    assert compared == volume.shape[0] == predicted.shape[0] == 8


def test_predict_seg_default_flags_match_fine_tuning_validation(trip: dict[str, Path]) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ckpt = torch.load(str(trip["seg_ckpt"]), map_location="cpu", weights_only=True)
    assert ckpt[CKPT_KEY]["inputs"] == {"nifti_modality": None}  # the sidecar decided, as in prep
    mask = np.asarray(nib.load(str(trip["masks"] / "ct_b_seg.nii.gz")).dataobj)
    truth = np.asarray(nib.load(str(trip["val_label"])).dataobj)
    dice = 2 * np.logical_and(mask == 1, truth == 1).sum() / ((mask == 1).sum() + (truth == 1).sum())
    (events,) = {p.parent for p in (trip["root"] / "seg_runs").rglob("events.out.tfevents.*")}
    acc = EventAccumulator(str(events))
    acc.Reload()
    assert dice == pytest.approx(acc.Scalars("val/dice")[-1].value, abs=1e-4)


def test_a_contradicting_modality_stops_with_one_line(
    trip: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    out = trip["root"] / "other_masks"
    with pytest.raises(SystemExit) as done:
        medmae_main(["predict-seg", str(trip["seg_ckpt"]), str(trip["val_image"]), "--out", str(out),
                     "--modality", "MR"])  # fmt: skip
    assert done.value.code == 2
    err = capsys.readouterr().err
    assert "--modality MR contradicts its JSON sidecar (Modality CT)" in err and "Traceback" not in err
    assert not out.exists() or not any(out.iterdir())


def test_predict_seg_never_overwrites(trip: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    """Same base names get distinct masks; an --out over an input, or an existing mask, is refused."""
    root, ckpt = trip["root"] / "overwrite", str(trip["seg_ckpt"])
    for sub in ("a", "b"):
        (root / sub).mkdir(parents=True)
        for suffix in (".nii.gz", ".json"):
            (root / sub / f"ct{suffix}").write_bytes((trip["val_image"].parent / f"ct_b{suffix}").read_bytes())
    first, second = str(root / "a" / "ct.nii.gz"), str(root / "b" / "ct.nii.gz")
    assert medmae_main(["predict-seg", ckpt, first, second, "--out", str(root / "masks")]) == 0
    a, b = root / "masks" / "a" / "ct_seg.nii.gz", root / "masks" / "b" / "ct_seg.nii.gz"
    assert a.is_file() and b.is_file()
    stamp = a.stat().st_mtime_ns

    def refused(*args: str) -> str:
        with pytest.raises(SystemExit) as done:
            medmae_main(["predict-seg", ckpt, *args])
        assert done.value.code == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err
        return err

    assert "exists; pass --overwrite" in refused(first, second, "--out", str(root / "masks"))
    assert a.stat().st_mtime_ns == stamp
    assert medmae_main(["predict-seg", ckpt, first, second, "--out", str(root / "masks"), "--overwrite"]) == 0
    assert a.stat().st_mtime_ns != stamp
    # a mask named like an input in the --out folder: the input is never replaced
    planted = root / "a" / "x_seg.nii.gz"
    for name in ("x.nii.gz", "x_seg.nii.gz"):
        (root / "a" / name).write_bytes((root / "a" / "ct.nii.gz").read_bytes())
    original = planted.read_bytes()
    assert "would overwrite or sit inside the input" in refused(str(root / "a" / "x.nii.gz"), str(planted),
                                                               "--out", str(root / "a"), "--overwrite")
    assert planted.read_bytes() == original
    assert "given twice" in refused(first, first, "--out", str(root / "m2"))
    assert not list((root / "masks").rglob(".partial-*"))
