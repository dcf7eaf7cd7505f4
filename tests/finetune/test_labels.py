"""Labels that are not class maps are refused; 4D images are read as their first volume, with a warning.

A one-hot label ``(X, Y, Z, K)`` or a label over time ``(X, Y, Z, T)`` used to be read like a 4D
image (its first volume): the background channel of a one-hot label became the class map, silently.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medmae.data import CacheDataModule
from medmae.export import export_encoder
from medmae.finetune.seg_cli import finetune_main
from medmae.finetune.volumes import VolumeError, read_label, read_nifti_image
from medmae.models import create_mae

pytestmark = pytest.mark.usefixtures("one_thread")

AFFINE = np.diag([1.5, 1.5, 3.0, 1.0])
SHAPE = (16, 16, 6)


def _class_map() -> np.ndarray:
    labels = np.zeros(SHAPE, np.uint8)
    labels[4:10, 4:10, 1:4] = 1
    labels[10:14, 2:6, 2:5] = 2
    return labels


def _save(path: Path, data: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(data, AFFINE), str(path))
    return path


@pytest.fixture
def image(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    return _save(tmp_path / "image.nii.gz", rng.normal(100, 20, SHAPE).astype(np.float32))


def _one_hot(labels: np.ndarray, k: int = 3) -> np.ndarray:
    return np.stack([(labels == c).astype(np.uint8) for c in range(k)], axis=-1)


def test_one_hot_label_is_refused_naming_file_and_shape(tmp_path: Path, image: Path) -> None:
    label = _save(tmp_path / "onehot_label.nii.gz", _one_hot(_class_map()))
    with pytest.raises(VolumeError, match=r"onehot_label\.nii\.gz: .*\(16, 16, 6, 3\)") as e:
        read_label(label, read_nifti_image(image), 3)
    assert "\n" not in str(e.value)


def test_label_over_time_is_refused(tmp_path: Path, image: Path) -> None:
    series = np.stack([_class_map()] * 4, axis=-1)  # the same class map at 4 time points
    label = _save(tmp_path / "timed_label.nii.gz", series)
    with pytest.raises(VolumeError, match=r"timed_label\.nii\.gz: .*\(16, 16, 6, 4\)"):
        read_label(label, read_nifti_image(image), 3)


def test_class_maps_with_a_trailing_singleton_axis_still_load(tmp_path: Path, image: Path) -> None:
    label = _save(tmp_path / "label.nii.gz", _class_map()[..., None])  # (X, Y, Z, 1): one volume
    vol = read_nifti_image(image)
    out = read_label(label, vol, 3)
    assert out.shape == vol.shape and set(np.unique(out).tolist()) == {0, 1, 2}


def test_a_4d_image_is_its_first_volume_with_a_warning(
    tmp_path: Path, image: Path, caplog: pytest.LogCaptureFixture
) -> None:
    first = np.asarray(nib.load(str(image)).dataobj)
    series = _save(tmp_path / "series.nii.gz", np.stack([first, first + 500], axis=-1))
    with caplog.at_level(logging.WARNING, logger="medmae.finetune.volumes"):
        vol = read_nifti_image(series)
    np.testing.assert_array_equal(vol.array, read_nifti_image(image).array)
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("series.nii.gz" in m and "(16, 16, 6, 2)" in m and "first volume" in m for m in warned), warned


def test_finetune_seg_stops_on_a_one_hot_label_in_one_line(
    tmp_path: Path, image: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    encoder = tmp_path / "encoder"
    mae = create_mae("mae_vit_tiny_patch16", img_size=32, patch_size=8, depth=2, decoder_depth=1)
    export_encoder(mae, encoder, preprocessing=CacheDataModule(str(tmp_path / "nc"), img_size=32).preprocessing())
    good = _save(tmp_path / "good_label.nii.gz", _class_map())
    onehot = _save(tmp_path / "onehot_label.nii.gz", _one_hot(_class_map()))
    cases = tmp_path / "cases.csv"
    with open(cases, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "label", "patient", "split"])
        w.writerow([image.name, good.name, "a", "train"])
        w.writerow([image.name, onehot.name, "b", "val"])
    with pytest.raises(SystemExit) as done:
        finetune_main([
            "--config", "configs/finetune/seg_tiny_cpu.yaml", "--model.init", f"medmae:{encoder}",
            "--model.num_classes", "3", "--data.csv", str(cases), "--trainer.max_steps", "1",
            "--trainer.default_root_dir", str(tmp_path), "--trainer.logger", "false",
            "--trainer.enable_checkpointing", "false", "--trainer.callbacks", "null",
        ])  # fmt: skip
    assert done.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and "onehot_label.nii.gz" in lines[0] and "(16, 16, 6, 3)" in lines[0], err
    assert "Traceback" not in err
