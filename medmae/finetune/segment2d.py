"""The 2D half of segmentation fine-tuning: MONAI UNETR (2D) or the light decoder, and plane prediction.

:mod:`medmae.finetune.segment3d` is the 3D half; :mod:`medmae.finetune.dims` picks one per card.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from medmae.data.plane_transform import PlanePreprocessor
from medmae.export.encoder import timm_from_encoder
from medmae.export.unetr import unetr_from_encoder
from medmae.finetune.light_decoder import LightSegmenter

if TYPE_CHECKING:
    from medmae.finetune.encoders import EncoderSource


def build_segmenter2d(
    source: EncoderSource,
    num_classes: int,
    feature_size: int = 16,
    cls_token: bool = True,
    dropout_rate: float = 0.0,
    decoder: str = "unetr",
    tap_norm: bool = True,
) -> nn.Module:
    """``unetr``: MONAI UNETR (patch 16, >= 10 blocks); ``light``: the same design over the timm encoder
    for any power-of-two patch and depth (:mod:`medmae.finetune.light_decoder`)."""
    pre = source.preprocessing
    assert isinstance(pre, PlanePreprocessor)
    if decoder == "unetr":
        return unetr_from_encoder(
            source.spec,
            source.state,
            num_classes,
            img_size=pre.image_size,
            in_chans=pre.channels,
            feature_size=feature_size,
            cls_token=cls_token,
            dropout_rate=dropout_rate,
            where=source.init.describe(),
        )
    encoder = timm_from_encoder(
        source.spec, source.state, None, img_size=pre.image_size, in_chans=pre.channels, proj_drop_rate=dropout_rate
    )
    return LightSegmenter(encoder, num_classes, feature_size, tap_norm=tap_norm)


@torch.no_grad()
def predict_planes(
    net: nn.Module, images: torch.Tensor, pre: PlanePreprocessor, plane_shape: tuple[int, int], batch: int = 16
) -> np.ndarray:
    """Class map of every plane at its original resolution: ``(Z, h, w)`` uint8."""
    device = next(net.parameters()).device
    out = []
    for start in range(0, images.shape[0], batch):
        logits = net(images[start : start + batch].to(device))
        out.append(pre.restore(logits, plane_shape).argmax(1).to(torch.uint8).cpu())
    return torch.cat(out).numpy()
