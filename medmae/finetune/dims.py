"""One strategy per spatial dimensionality of segmentation fine-tuning: planes (2D / 2.5D) or volumes (3D).

The card decides once (:func:`dims_for` on its input transform: ``spatial_dims`` 2 or 3); everything
that differs between a 2D and a 3D encoder then goes through the chosen object instead of a type test:

==================  ==============================================  ==========================================
step                :class:`PlaneDims`                              :class:`VolumeDims`
==================  ==============================================  ==========================================
network             UNETR 2D / light decoder (``segment2d``)        UNETR 3D / light decoder (``segment3d``)
prepare a case      encoder-grid planes (``seg_data2d``)            the series at the card's spacing (``seg_data3d``)
training data       planes, random-resized crops                    random 3D patches
predict a case      planes, restored to each plane                  sliding windows, restored to the series
encoder input       planes of the input's kind                      the resampled volume (images refused)
==================  ==============================================  ==========================================

Example::

    dims = dims_for(source.preprocessing)
    pred, truth = dims.predict_case(net, case, source.preprocessing)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from medmae.data.plane_transform import PlanePreprocessor
from medmae.data.transform_record import Transform
from medmae.data.volume_transform import VolumePreprocessor
from medmae.finetune.cases import Case
from medmae.finetune.samples import PlaneDataset
from medmae.finetune.seg_data2d import PreparedCase, prepare_case
from medmae.finetune.seg_data3d import PatchDataset, PreparedVolume, check_volume_kind, prepare_volume_case
from medmae.finetune.segment2d import build_segmenter2d, predict_planes
from medmae.finetune.segment3d import build_segmenter3d, predict_volume3d
from medmae.finetune.volumes import Volume

if TYPE_CHECKING:
    from medmae.finetune.encoders import EncoderSource
    from medmae.finetune.seg_data import SegmentationDataModule


class PlaneDims:
    """2D / 2.5D encoders: every step works on planes along the card's axis."""

    spatial_dims = 2

    def build_network(
        self, source: EncoderSource, num_classes: int, feature_size: int, cls_token: bool, dropout_rate: float,
        decoder: str, tap_norm: bool,
    ) -> nn.Module:  # fmt: skip
        return build_segmenter2d(source, num_classes, feature_size, cls_token, dropout_rate, decoder, tap_norm)

    def prepare_case(
        self, case: Case, pre: PlanePreprocessor, num_classes: int, modality: str | None, cache_dir: str | None
    ) -> PreparedCase:
        return prepare_case(case, pre, num_classes, modality, cache_dir)

    def train_loader(self, dm: SegmentationDataModule) -> DataLoader:
        """Labelled planes of the training cases (``samples_per_epoch`` draws, else each plane once)."""
        if dm.train_set is None:
            dm.train_set = PlaneDataset(
                [c.images for c in dm.train_cases], dm.crop_scale, dm.hflip_prob, dm.seed,
                labels=[c.labels for c in dm.train_cases], only_labelled=not dm.include_empty_planes,
                extra=dm.augment,
            )  # fmt: skip
        data = dm.train_set
        n = dm.samples_per_epoch or max(len(data), dm.batch_size)
        return dm.train_loader(data, n, dm.batch_size, dm.num_workers, dm.seed)

    def predict_case(
        self, net: nn.Module, case: PreparedCase, pre: PlanePreprocessor, batch: int = 16, overlap: float = 0.25
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(prediction, labels)`` of a prepared case, plane by plane at the planes' own resolution."""
        return predict_planes(net, case.images, pre, case.plane_shape, batch), case.label_stack

    def encoder_input(self, pre: PlanePreprocessor, volume: Volume) -> torch.Tensor:
        """The planes ``(N, C, H, W)`` of a whole input, read as its kind."""
        pre = pre.for_input(volume.kind)
        return pre.forward(volume.array, volume.intensity, volume.stats, spacing=volume.spacing)

    def predict_volume(
        self, net: nn.Module, pre: PlanePreprocessor, volume: Volume, image: torch.Tensor, batch: int = 16,
        overlap: float = 0.25,
    ) -> np.ndarray:  # fmt: skip
        """The canonical (Z, Y, X) class map of an input from its :meth:`encoder_input`."""
        pre = pre.for_input(volume.kind)
        stack_shape = pre.stack(volume.array).shape
        pred = predict_planes(net, image, pre, tuple(stack_shape[1:]), batch)
        canonical = np.zeros(volume.shape, dtype=np.uint8)
        pre.stack(canonical)[...] = pred  # the plane view writes through to the (Z, Y, X) array
        return canonical


class VolumeDims:
    """3D encoders: whole series at the card's spacing, random patches, sliding windows."""

    spatial_dims = 3

    def build_network(
        self, source: EncoderSource, num_classes: int, feature_size: int, cls_token: bool, dropout_rate: float,
        decoder: str, tap_norm: bool,
    ) -> nn.Module:  # fmt: skip
        return build_segmenter3d(source, num_classes, feature_size, dropout_rate, decoder, tap_norm)

    def prepare_case(
        self, case: Case, pre: VolumePreprocessor, num_classes: int, modality: str | None, cache_dir: str | None
    ) -> PreparedVolume:
        return prepare_volume_case(case.image, str(case.label), pre, num_classes, case.modality or modality, cache_dir)

    def train_loader(self, dm: SegmentationDataModule) -> DataLoader:
        """``samples_per_epoch`` distinct random patches per epoch (each index its own draw)."""
        if dm.train_set is None:
            n = dm.samples_per_epoch or max(len(dm.train_cases), dm.batch_size)
            dm.train_set = PatchDataset(
                dm.train_cases, n, dm.preprocessing.size, dm.crop_scale, dm.hflip_prob, dm.foreground_prob, dm.seed
            )
        return dm.train_loader(dm.train_set, len(dm.train_set), dm.batch_size, dm.num_workers, dm.seed)

    def predict_case(
        self, net: nn.Module, case: PreparedVolume, pre: VolumePreprocessor, batch: int = 16, overlap: float = 0.25
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(prediction, labels)`` of a prepared case on the series' own grid, by sliding windows."""
        return predict_volume3d(net, case.image, pre, case.shape, case.spacing, overlap, batch), case.label

    def encoder_input(self, pre: VolumePreprocessor, volume: Volume) -> torch.Tensor:
        """The whole volume ``(C, z, y, x)`` at the card's spacing; a single 2D image is refused."""
        check_volume_kind(volume)
        return pre.forward(volume.array, volume.intensity, volume.stats, volume.spacing)

    def predict_volume(
        self, net: nn.Module, pre: VolumePreprocessor, volume: Volume, image: torch.Tensor, batch: int = 16,
        overlap: float = 0.25,
    ) -> np.ndarray:  # fmt: skip
        """The canonical (Z, Y, X) class map of an input from its :meth:`encoder_input`."""
        return predict_volume3d(net, image, pre, volume.shape, volume.spacing, overlap, batch)


Dims = PlaneDims | VolumeDims
DIMS: dict[int, Dims] = {2: PlaneDims(), 3: VolumeDims()}


def dims_for(transform: Transform) -> Dims:
    """The strategy of a card's input transform (by its ``spatial_dims``)."""
    return DIMS[transform.spatial_dims]
