"""Encoder export: safetensors weights of the timm ViT + a JSON card (architecture, preprocessing)."""

from medmae.export.encoder import export_checkpoint, export_encoder, load_card, load_timm_encoder

__all__ = ["export_checkpoint", "export_encoder", "load_card", "load_timm_encoder"]
