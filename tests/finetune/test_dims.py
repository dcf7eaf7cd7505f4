"""dims_for: one strategy per spatial dimensionality, chosen by the card's transform; a single 2D image
(kind ``image``) flows through prediction as its one plane under every axis."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from medmae.data import CacheDataModule
from medmae.data.intensity import IntensityRule
from medmae.data.transform_record import build_transform
from medmae.data.volume import VolumeOptions, VolumeTransform
from medmae.finetune.dims import PlaneDims, VolumeDims, dims_for
from medmae.finetune.seg_cli import encoder_input
from medmae.finetune.volumes import Volume, VolumeError

pytestmark = pytest.mark.usefixtures("one_thread")


def plane_transform(tmp_path: Path, axis: str):
    return build_transform(CacheDataModule(str(tmp_path / "cache"), img_size=16, slices=3, axis=axis).preprocessing())


def radiograph(kind: str = "image") -> Volume:
    yy, xx = np.mgrid[:40, :30]
    array = ((yy * 61 + xx * 17) % 4096).astype(np.float32)[None]
    stats = {"min": 0.0, "p0.5": 0.0, "p99.5": 4095.0}
    return Volume("cr", array, np.diag([0.2, 0.2, 1.0, 1.0]), "raw", stats, kind=kind, modality="CR")


class Threshold(nn.Module):
    """Two-class "logits" from the centre channel: class 1 where it is above one half."""

    def __init__(self) -> None:
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        centre = x[:, x.shape[1] // 2 : x.shape[1] // 2 + 1]
        return torch.cat([0.5 - centre, centre - 0.5], dim=1)


def test_the_card_picks_the_strategy(tmp_path: Path) -> None:
    assert isinstance(dims_for(plane_transform(tmp_path, "axial")), PlaneDims)
    volume = build_transform(VolumeTransform(VolumeOptions(size=16), IntensityRule.checked()).describe())
    assert isinstance(dims_for(volume), VolumeDims)
    assert dims_for(volume).spatial_dims == 3 and dims_for(plane_transform(tmp_path, "axial")).spatial_dims == 2


@pytest.mark.parametrize("axis", ["coronal", "sagittal"])
def test_a_radiograph_under_a_coronal_or_sagittal_card_is_predicted_as_one_plane(tmp_path: Path, axis: str) -> None:
    volume, net = radiograph(), Threshold()
    axial = plane_transform(tmp_path / "axial", "axial")
    pre = plane_transform(tmp_path / axis, axis)
    image = encoder_input(pre, volume)  # predict-seg's path
    assert image.shape == (1, 3, 16, 16)
    assert torch.equal(image, encoder_input(axial, volume))
    mask = dims_for(pre).predict_volume(net, pre, volume, image)
    assert mask.shape == volume.shape == (1, 40, 30)
    np.testing.assert_array_equal(mask, dims_for(axial).predict_volume(net, axial, volume, image))
    assert 0 < mask.mean() < 1  # a real picture of both classes, not strips of one row
    # read as a volume, the same array is cut into one-row strips: the kind must flow through
    strips = encoder_input(pre, radiograph(kind="volume"))
    assert strips.shape[0] == (40 if axis == "coronal" else 30)


def test_a_3d_card_refuses_a_single_image_in_one_line(tmp_path: Path) -> None:
    pre = build_transform(VolumeTransform(VolumeOptions(size=16), IntensityRule.checked()).describe())
    with pytest.raises(VolumeError, match="cr: .*a single 2D image \\(kind image\\) cannot feed a 3D encoder"):
        encoder_input(pre, radiograph())
