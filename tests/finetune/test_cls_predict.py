"""``medmae predict-cls``: from a ``finetune-cls`` checkpoint alone, the probabilities fine-tuning's own
validation computes, for NIfTI files, DICOM series folders and CSVs (issue 16, item 5: the command was missing)."""

from __future__ import annotations

import csv
from pathlib import Path

import pydicom
import pydicom.data
import pytest
import torch

from medmae.cli import main as medmae_main
from medmae.finetune.classify import ClassificationModule
from medmae.finetune.cls_data import ClassificationDataModule
from medmae.finetune.cls_predict import load_classifier
from tests.finetune.test_classify import CLASSES, _run, cls_csv, cls_encoder  # noqa: F401 - fixtures

CLASS_LIST = ["e4d", "n2", "func"]


@pytest.fixture(scope="module")
def cls_ckpt(tmp_path_factory: pytest.TempPathFactory, cls_encoder: Path, cls_csv: Path) -> Path:  # noqa: F811
    run = tmp_path_factory.mktemp("cls_run")
    _run(run, cls_encoder, cls_csv, 6, "--data.max_planes", "7", "--data.samples_per_epoch", "48")
    return run / "ckpt" / "last.ckpt"


def read_out(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_predict_cls_gives_fine_tuning_validation_probabilities(
    tmp_path: Path, cls_ckpt: Path, cls_encoder: Path, cls_csv: Path  # noqa: F811
) -> None:
    out = tmp_path / "probs.csv"
    assert medmae_main(["predict-cls", str(cls_ckpt), "--csv", str(cls_csv), "--out", str(out), "--planes"]) == 0
    rows = read_out(out)
    assert list(rows[0]) == ["image", "plane", "p_e4d", "p_n2", "p_func", "prediction"]
    series = {r["image"]: r for r in rows if r["plane"] == ""}
    # the fine-tuning module and datamodule (export folder, config) on the validation series
    module = ClassificationModule.load_from_checkpoint(str(cls_ckpt), map_location="cpu").eval()
    dm = ClassificationDataModule(f"medmae:{cls_encoder}", str(cls_csv), "multiclass", CLASS_LIST, max_planes=7)
    dm.setup()
    val_names = [c.image for c in dm.rows() if c.split == "val"]
    assert len(val_names) == len(dm.val_series) == 4
    for name, prepared in zip(val_names, dm.val_series, strict=True):
        expected = module.series_probabilities(prepared.images)
        got = series[Path(name).name]
        torch.testing.assert_close(torch.tensor([float(got[f"p_{c}"]) for c in CLASS_LIST]), expected,
                                   atol=2e-6, rtol=0)
        assert got["prediction"] == CLASS_LIST[int(expected.argmax())]
        planes = [r for r in rows if r["image"] == Path(name).name and r["plane"] != ""]
        assert len(planes) == prepared.images.shape[0] <= 7  # the recorded plane budget
    assert len(series) == len(read_out(cls_csv))


def test_predict_cls_reads_files_and_dicom_folders_and_never_overwrites(
    tmp_path: Path, cls_ckpt: Path, cls_csv: Path, capsys: pytest.CaptureFixture[str]  # noqa: F811
) -> None:
    folder = tmp_path / "ct_series"
    folder.mkdir()
    ds = pydicom.dcmread(pydicom.data.get_testdata_file("CT_small.dcm"))
    ds.save_as(folder / "ct.dcm")
    image = cls_csv.parent / "n2_t0.nii.gz"
    out = tmp_path / "probs.csv"
    assert medmae_main(["predict-cls", str(cls_ckpt), str(image), str(folder), "--out", str(out)]) == 0
    rows = read_out(out)
    assert [r["image"] for r in rows] == [str(image), str(folder)]
    for r in rows:
        assert sum(float(r[f"p_{c}"]) for c in CLASS_LIST) == pytest.approx(1.0, abs=1e-4)
    before = out.read_bytes()
    with_sidecar = tmp_path / "s.nii.gz"
    with_sidecar.write_bytes(image.read_bytes())
    (tmp_path / "s.json").write_text('{"Modality": "PT"}')
    for args, message in (
        ([str(image), "--out", str(out)], "exists; pass --overwrite"),
        (["--csv", str(cls_csv), "--out", str(cls_csv), "--overwrite"], "would overwrite or sit inside the input"),
        ([str(folder), "--out", str(folder / "p.csv")], "would overwrite or sit inside the input"),
        ([str(with_sidecar), "--out", str(tmp_path / "x.csv"), "--modality", "MR"], "contradicts its JSON sidecar"),
    ):
        with pytest.raises(SystemExit) as done:
            medmae_main(["predict-cls", str(cls_ckpt), *args])
        assert done.value.code == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (args, err)
    assert out.read_bytes() == before and not (tmp_path / "x.csv").exists() and not (folder / "p.csv").exists()
    model = load_classifier(cls_ckpt)
    assert (model.max_planes, model.nifti_modality, model.level) == (7, None, "slice")
