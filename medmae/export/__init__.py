"""Encoder export and transfer: safetensors weights + JSON card, loaders into timm and MONAI UNETR,
and the pretraining preprocessing rebuilt from the card."""

from medmae.export.card import CardError, load_card
from medmae.export.encoder import (
    CheckpointError,
    export_checkpoint,
    export_encoder,
    load_timm_encoder,
    read_checkpoint,
)
from medmae.export.preprocessing import PlanePreprocessor, preprocessing_from_card
from medmae.export.unetr import EncoderUNETR, build_unetr

__all__ = [
    "CardError",
    "CheckpointError",
    "EncoderUNETR",
    "PlanePreprocessor",
    "build_unetr",
    "export_checkpoint",
    "export_encoder",
    "load_card",
    "load_timm_encoder",
    "preprocessing_from_card",
    "read_checkpoint",
]
