"""Fine-tuning reads inputs as prep does: a NIfTI's modality by prep's rule (option > sidecar > BIDS > OT),
and a single radiograph (kind ``image``) as one plane under every slicing axis.

The modality tests failed before issue 16 (item 1: fine-tuning fell back to ``OT`` whatever the sidecar
said); the radiograph test too (item 2: a CR image under a coronal card became 1-row strips).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from pydicom.uid import generate_uid

from data_prep import prep_archive
from medmae.data import CacheDataModule
from medmae.data.dataset import CacheSliceDataset
from medmae.export import preprocessing_from_card
from medmae.finetune.cls_data import series_planes
from medmae.finetune.volumes import VolumeError, prediction_modality, read_image, read_nifti_image, recorded_modality
from tests.data_prep.factory import CR_IMAGE, Identity, base_dataset, save, set_pixels


def ct_nifti(path: Path, sidecar: dict | None) -> Path:
    data = np.linspace(-1000, 1000, 8 * 8 * 4).reshape(8, 8, 4).astype(np.int16)
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))
    if sidecar is not None:
        path.with_name(path.name.removesuffix(".nii.gz") + ".json").write_text(json.dumps(sidecar))
    return path


def test_sidecar_decides_the_modality_as_in_prep(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ct = read_nifti_image(ct_nifti(tmp_path / "ct.nii.gz", {"Modality": "CT", "PatientName": "Doe^Jane"}))
    assert (ct.modality, ct.modality_source, ct.intensity, ct.array.dtype) == ("CT", "sidecar", "HU", np.int16)
    assert ct.stats["min"] == -1000.0  # values stay HU
    plain = read_nifti_image(ct_nifti(tmp_path / "plain.nii.gz", None))
    assert (plain.modality, plain.modality_source, plain.intensity) == ("OT", "default", "raw")
    bids = read_nifti_image(ct_nifti(tmp_path / "sub-01_T1w.nii.gz", None))
    assert (bids.modality, bids.modality_source) == ("MR", "bids_suffix")
    with caplog.at_level(logging.WARNING):
        forced = read_nifti_image(tmp_path / "ct.nii.gz", "MR")  # an option wins, with a warning, as in prep
    assert (forced.modality, forced.modality_source, forced.intensity) == ("MR", "option", "raw")
    assert "its JSON sidecar says CT" in caplog.text and "Doe" not in caplog.text
    assert read_image(str(tmp_path / "plain.nii.gz"), modality="CT").intensity == "HU"


@pytest.mark.parametrize(
    ("sidecar", "reason"),
    [
        ({"Modality": "CT", "ImageType": ["ORIGINAL", "PRIMARY", "LOCALIZER"]}, "localizer"),
        ({"Modality": "CT", "BurnedInAnnotation": "YES"}, "burned_in_annotation"),
        ({"Modality": "CT", "ImageType": ["DERIVED", "SECONDARY"]}, "secondary_capture"),
    ],
)
def test_an_image_prep_refuses_is_refused_downstream_too(tmp_path: Path, sidecar: dict, reason: str) -> None:
    """A converted scout, screenshot or secondary capture never reaches pretraining (prep rejects it by its
    sidecar); fine-tuning and prediction, which read images with ``read_image``, refuse it the same way."""
    (tmp_path / "archive").mkdir()
    image = ct_nifti(tmp_path / "archive" / "scan.nii.gz", sidecar)
    summary = prep_archive([tmp_path / "archive"], tmp_path / "cache", workers=1, val_fraction=0.0, progress=False)
    assert summary.rejects.get(reason) == 1  # what prep did with the same file
    with pytest.raises(VolumeError, match=f"scan.nii.gz: refused as medmae prep refuses it \\({reason}: "):
        read_image(str(image))
    vouched = dict(sidecar, BurnedInAnnotation="NO") if reason == "secondary_capture" else None
    if vouched is not None:  # prep keeps a secondary capture whose header vouches for clean pixels: so do we
        ct_nifti(image, vouched)
        assert read_image(str(image)).modality == "CT"


def test_prediction_applies_the_record_and_refuses_contradictions(tmp_path: Path) -> None:
    ct = str(ct_nifti(tmp_path / "ct.nii.gz", {"Modality": "CT"}))
    plain = str(ct_nifti(tmp_path / "plain.nii.gz", None))
    assert prediction_modality(ct, None, None) is None  # the sidecar will decide, as in fine-tuning
    assert prediction_modality(plain, "CT", None) == "CT"  # the recorded rule by default
    assert prediction_modality(ct, "CT", "CT") == "CT" and prediction_modality(plain, None, "CT") == "CT"
    with pytest.raises(VolumeError, match="--modality MR contradicts its JSON sidecar"):
        prediction_modality(ct, None, "MR")
    with pytest.raises(VolumeError, match="--modality MR contradicts the checkpoint: fine-tuning read every NIfTI"):
        prediction_modality(plain, "CT", "MR")
    assert recorded_modality(None, "ckpt") is None and recorded_modality({"nifti_modality": "CT"}, "ckpt") == "CT"
    with pytest.raises(ValueError, match="ckpt: field 'inputs.nifti_modality'"):
        recorded_modality({"nifti_modality": "../../etc"}, "ckpt")


def cr_folder(folder: Path, size: int = 40) -> Path:
    """A square 12-bit CR radiograph (kind ``image``: no patient geometry)."""
    ds = base_dataset(CR_IMAGE, "CR", Identity(), generate_uid())
    ds.ImagerPixelSpacing = [0.2, 0.2]
    yy, xx = np.mgrid[:size, :size]
    set_pixels(ds, ((yy * 61 + xx * 17) % 4096).astype(np.uint16), bits_stored=12)
    save(ds, folder / "cr.dcm")
    return folder


@pytest.mark.parametrize("axis", ["axial", "coronal", "sagittal"])
def test_a_radiograph_is_one_plane_under_every_axis_as_in_pretraining(tmp_path: Path, axis: str) -> None:
    folder = cr_folder(tmp_path / "archive" / "cr")
    dm = CacheDataModule(str(tmp_path / "cache"), img_size=16, slices=3, axis=axis, selection={"min_size": 16},
                         num_workers=0)
    pre = preprocessing_from_card({"preprocessing": dm.preprocessing()})
    volume = read_image(str(folder))
    assert volume.kind == "image" and volume.shape == (1, 40, 40)
    planes = series_planes(volume, pre, None)  # classification's path (and predict-cls's)
    assert planes.shape == (1, 3, 16, 16)
    assert torch.equal(planes[:, 0], planes[:, 2])  # 2.5D channels repeat the one plane
    assert pre.labels(np.zeros((1, 40, 40), np.uint8), kind=volume.kind).shape == (1, 16, 16)
    # pretraining read the same picture from the cache as its one plane: the same numbers
    prep_archive([tmp_path / "archive"], tmp_path / "cache", workers=1, val_fraction=0.0, progress=False)
    dm.setup("fit")
    pretraining = CacheSliceDataset(tmp_path / "cache", dm.train_dataset.index, dm.transform, random_crop=False)
    assert len(pretraining) == 1
    torch.testing.assert_close(planes[0], pretraining[0]["image"], atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="an image \\(kind 'image'\\) has one plane"):
        pre.stack(np.zeros((3, 4, 4)), "image")
