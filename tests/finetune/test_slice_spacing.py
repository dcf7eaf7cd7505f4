"""Fine-tuning reads 2.5D channels at the card's millimetres: the volume's own spacing reaches the card's
preprocessing in both the classification and the segmentation data paths."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medmae.data import CacheDataModule
from medmae.export import preprocessing_from_card
from medmae.finetune.cases import Case
from medmae.finetune.cls_data import prepare_series
from medmae.finetune.encoders import EncoderSource
from medmae.finetune.seg_data import prepare_case
from medmae.finetune.volumes import read_nifti_image

HU_PER_MM = 8.0


def ramp_nifti(path: Path, slice_mm: float) -> Path:
    """A CT NIfTI 40 mm tall whose axial plane at height z mm holds ``8 * z - 160`` HU."""
    z_mm = np.arange(int(round(40 / slice_mm)) + 1) * slice_mm
    data = np.broadcast_to(HU_PER_MM * z_mm - 160, (16, 16, len(z_mm))).astype(np.int16)
    nib.save(nib.Nifti1Image(np.ascontiguousarray(data), np.diag([0.7, 0.7, slice_mm, 1.0])), str(path))
    return path


def offsets_mm(image: torch.Tensor) -> np.ndarray:
    return ((image - image[1:2]) * 1000.0 / HU_PER_MM).mean(dim=(1, 2)).numpy()


@pytest.mark.parametrize("slice_mm", [0.625, 2.5])
def test_classification_and_segmentation_planes_sit_at_the_cards_millimetres(tmp_path: Path, slice_mm: float) -> None:
    record = CacheDataModule(str(tmp_path / "none"), img_size=16, slices=3, slice_spacing_mm=2.5,
                             intensity={"ct_windows": [[0, 1000]]}).preprocessing()
    pre = preprocessing_from_card({"preprocessing": record})
    image = ramp_nifti(tmp_path / "ct.nii.gz", slice_mm)
    assert read_nifti_image(image, "CT").spacing == pytest.approx((slice_mm, 0.7, 0.7))
    centre = int(round(20 / slice_mm))

    series = prepare_series(Case(2, str(image), (1.0,), "p", "train", "CT"), pre, tmp_path / "x.csv", None, None, None)
    np.testing.assert_allclose(offsets_mm(series.images[centre]), [-2.5, 0.0, 2.5], atol=1e-3)

    label = tmp_path / "label.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((16, 16, centre * 2 + 1), np.uint8), nib.load(str(image)).affine), str(label))
    case = prepare_case(Case(2, str(image), str(label), "p", "train"), pre, 2, "CT", None)
    np.testing.assert_allclose(offsets_mm(case.images[centre]), [-2.5, 0.0, 2.5], atol=1e-3)


def test_fine_tuning_checkpoints_keep_the_rule_for_inference(tmp_path: Path) -> None:
    """``predict-seg`` rebuilds the preprocessing from the checkpoint record, not from the card."""
    record = CacheDataModule(str(tmp_path / "none"), img_size=16, slices=3, slice_spacing_mm=2.5,
                             slice_interpolation="linear").preprocessing()
    pre = preprocessing_from_card({"preprocessing": record})
    encoder = {"arch": "vit_tiny_patch16_224", "kwargs": {}, "in_chans": 3, "img_size": [16, 16], "patch_size": 16,
               "embed_dim": 192}
    saved = {"encoder": encoder, "preprocessing": dataclasses.asdict(pre), "input_norm": None}
    assert EncoderSource.from_record(saved).preprocessing == pre
    old = {**saved, "preprocessing": {k: v for k, v in saved["preprocessing"].items() if not k.startswith("slice_s")}}
    del old["preprocessing"]["slice_interpolation"]
    assert EncoderSource.from_record(old).preprocessing.slice_spacing_mm is None  # older checkpoints: by index
