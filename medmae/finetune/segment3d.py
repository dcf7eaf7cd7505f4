"""The 3D half of segmentation fine-tuning: MONAI ``UNETR(spatial_dims=3)`` or the light decoder, and
sliding-window inference.

:class:`~medmae.finetune.segment.SegmentationModule` (the same module, loss, layer-wise lr decay and
warmup-cosine as 2D) calls into this module when ``model.init`` names a 3D export
(``arch: medmae_vit3d``):

* ``decoder: unetr``: MONAI's ``UNETR(spatial_dims=3)`` carrying the encoder through the key map of
  :mod:`medmae.export.unetr3d` (``img_size`` = the card's ``volume.size``, positions recomputed for
  it when it differs from the encoder's crop); ``random:DIR`` is the same network at MONAI's init;
* ``decoder: light``: :class:`~medmae.finetune.light_decoder.LightSegmenter` over medmae's own 3D
  encoder (:func:`light_encoder3d`): LayerNorm on each tapped block, any power-of-two patch and depth;
* whole volumes are predicted with MONAI ``sliding_window_inference`` (windows of the card's size,
  ``overlap`` configurable, windows blended uniformly: MONAI's ``constant`` mode), on the grid at the
  card's spacing, and the logits are brought back onto the series' own grid
  (:meth:`~medmae.data.volume_transform.VolumePreprocessor.restore_argmax`) before argmax, so
  Dice and masks are on the original voxels.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from timm.models import named_apply
from timm.models.vision_transformer import init_weights_vit_timm
from torch import nn

from medmae.data.volume_transform import VolumePreprocessor
from medmae.export.card import CardError, EncoderSpec3D
from medmae.export.unetr import UNETR_PATCH
from medmae.export.unetr3d import unetr3d_from_spec
from medmae.finetune.encoders import EncoderSource
from medmae.finetune.light_decoder import LightSegmenter
from medmae.models.mae3d import ViTEncoder3D, as_size3d


def build_segmenter3d(
    source: EncoderSource,
    num_classes: int,
    feature_size: int = 16,
    dropout_rate: float = 0.0,
    decoder: str = "unetr",
    tap_norm: bool = True,
) -> nn.Module:
    """The 3D network of a 3D encoder source (weights loaded when the source has them): MONAI UNETR 3D
    (``unetr``), or the ``light`` decoder over medmae's own 3D encoder (:func:`light_encoder3d`)."""
    spec, pre = source.spec, source.preprocessing
    assert isinstance(spec, EncoderSpec3D) and isinstance(pre, VolumePreprocessor)
    if decoder == "light":
        if dropout_rate:
            raise ValueError("model.dropout_rate is for the 3D UNETR; the 3D light decoder has no dropout (set 0)")
        encoder = light_encoder3d(spec, source.state, pre.size, source.init.describe())
        return LightSegmenter(encoder, num_classes, feature_size, tap_norm=tap_norm)
    if decoder != "unetr":
        raise ValueError(f"model.decoder is {decoder!r}; a 3D encoder (medmae_vit3d) takes unetr or light")
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


def light_encoder3d(
    spec: EncoderSpec3D, state: Mapping[str, torch.Tensor] | None, size: Sequence[int], where: str
) -> ViTEncoder3D:
    """medmae's 3D encoder at the fine-tuning window ``size``, for the ``light`` decoder.

    Its position embedding becomes a learnable parameter, as timm's is in 2D, so the three starts
    differ exactly as they do there: ``medmae`` gets the pretrained weights and the fixed sin-cos
    positions recomputed for ``size`` (a pure function of the grid, as UNETR 3D recomputes them);
    ``random`` (``state`` None) gets timm's ViT init with learnable random positions (N(0, 0.02));
    ``random-sincos`` is ``random`` with the positions copied from the ``medmae`` build.
    """
    encoder = ViTEncoder3D(
        spec.in_chans, as_size3d(size), spec.patch_size, spec.embed_dim, spec.depth, spec.num_heads,
        spec.mlp_ratio, spec.cls_token,
    )  # fmt: skip
    sincos = encoder.pos_embed
    del encoder.pos_embed  # the buffer goes; a parameter of the same name takes its place
    encoder.pos_embed = nn.Parameter(sincos.clone())
    if state is None:
        named_apply(init_weights_vit_timm, encoder)
        nn.init.trunc_normal_(encoder.pos_embed, std=0.02)
        if encoder.cls_token is not None:
            nn.init.normal_(encoder.cls_token, std=1e-6)
        return encoder
    weights = {k: v for k, v in state.items() if k != "pos_embed"}  # recomputed for the window above
    missing, unexpected = encoder.load_state_dict(weights, strict=False)
    if set(missing) != {"pos_embed"} or unexpected:
        lacking = sorted(set(missing) - {"pos_embed"})
        raise ValueError(
            f"{where}: encoder weights do not fit the 3D encoder: missing {lacking}, unexpected {unexpected}"
        )
    return encoder


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
