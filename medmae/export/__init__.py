"""Encoder export and transfer: safetensors weights + JSON card, loaders into timm and MONAI UNETR
(2D) or MONAI ViT / UNETR (3D). The pretraining preprocessing rebuilt from the card
(:func:`preprocessing_from_card`) is the input transform of ``medmae.data`` (plane_transform,
volume_transform), re-exported here."""

from medmae.data.plane_transform import PlanePreprocessor
from medmae.data.volume_transform import VolumePreprocessor
from medmae.export.card import CardError, load_card
from medmae.export.card_fields import preprocessing_from_card
from medmae.export.encoder import (
    CheckpointError,
    export_checkpoint,
    export_encoder,
    load_timm_encoder,
    read_checkpoint,
)
from medmae.export.unetr import EncoderUNETR, build_unetr
from medmae.export.unetr3d import build_unetr3d_from_export, load_vit3d

__all__ = [
    "CardError",
    "CheckpointError",
    "EncoderUNETR",
    "PlanePreprocessor",
    "VolumePreprocessor",
    "build_unetr",
    "build_unetr3d_from_export",
    "export_checkpoint",
    "export_encoder",
    "load_card",
    "load_timm_encoder",
    "load_vit3d",
    "preprocessing_from_card",
    "read_checkpoint",
]
