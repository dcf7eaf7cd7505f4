"""The 3D half of segmentation fine-tuning: MONAI ``UNETR(spatial_dims=3)`` and sliding-window inference.

:class:`~medmae.finetune.segment.SegmentationModule` (the same module, loss, layer-wise lr decay and
warmup-cosine as 2D) calls into this module when ``model.init`` names a 3D export
(``arch: medmae_vit3d``):

* the network is MONAI's ``UNETR(spatial_dims=3)`` carrying the encoder through the key map of
  :mod:`medmae.export.unetr3d` (``img_size`` = the card's ``volume.size``, positions recomputed for
  it when it differs from the encoder's crop); ``random:DIR`` is the same network at MONAI's init;
* whole volumes are predicted with MONAI ``sliding_window_inference`` (windows of the card's size,
  ``overlap`` configurable, windows blended uniformly: MONAI's ``constant`` mode), on the grid at the
  card's spacing, and the logits are brought back onto the series' own grid
  (:meth:`~medmae.data.volume_transform.VolumePreprocessor.restore_argmax`) before argmax, so
  Dice and masks are on the original voxels.
"""

from __future__ import annotations

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from torch import nn

from medmae.data.volume_transform import VolumePreprocessor
from medmae.export.card import CardError, EncoderSpec3D
from medmae.export.unetr import UNETR_PATCH
from medmae.export.unetr3d import unetr3d_from_spec
from medmae.finetune.encoders import EncoderSource


def build_segmenter3d(
    source: EncoderSource, num_classes: int, feature_size: int = 16, dropout_rate: float = 0.0, decoder: str = "unetr"
) -> nn.Module:
    """MONAI UNETR 3D for a 3D encoder source (weights loaded when the source has them)."""
    if decoder != "unetr":
        raise ValueError(
            f"model.decoder is {decoder!r}, but model.init names a 3D encoder (medmae_vit3d): 3D fine-tuning "
            "uses MONAI UNETR 3D; set model.decoder: unetr"
        )
    spec, pre = source.spec, source.preprocessing
    assert isinstance(spec, EncoderSpec3D) and isinstance(pre, VolumePreprocessor)
    if any(s % UNETR_PATCH for s in pre.size):
        raise CardError(
            f"{source.init.describe()}: field 'preprocessing.volume.size' is {list(pre.size)}; UNETR 3D windows "
            f"must be multiples of {UNETR_PATCH} voxels"
        )
    return unetr3d_from_spec(
        spec,
        source.state,
        num_classes,
        pre.size,
        feature_size=feature_size,
        dropout_rate=dropout_rate,
        where=source.init.describe(),
    )


@torch.no_grad()
def sliding_logits(
    net: nn.Module, image: torch.Tensor, roi: tuple[int, int, int], overlap: float = 0.25, batch: int = 4
) -> torch.Tensor:
    """Logits ``(K, z, y, x)`` of a whole preprocessed volume ``(C, z, y, x)`` by MONAI sliding windows.

    Windows run on the network's device (the volume itself may stay where it is); the stitched output
    is kept on the CPU (whole volumes can be large). A volume smaller than ``roi`` along an axis is
    padded by MONAI and cropped back.
    """
    device = next(net.parameters()).device
    out = sliding_window_inference(
        image[None],
        roi_size=roi,
        sw_batch_size=batch,
        predictor=net,
        overlap=overlap,
        mode="constant",
        sw_device=device,
        device=torch.device("cpu"),
    )
    return out[0].float()


def predict_volume3d(
    net: nn.Module,
    image: torch.Tensor,
    pre: VolumePreprocessor,
    shape: tuple[int, int, int],
    spacing: tuple[float, float, float],
    overlap: float = 0.25,
    batch: int = 4,
) -> np.ndarray:
    """Class map ``(Z, Y, X)`` uint8 on the series' own grid of a preprocessed volume ``(C, z, y, x)``."""
    logits = sliding_logits(net, image, pre.size, overlap, batch)
    return pre.restore_argmax(logits, shape, spacing).numpy()
