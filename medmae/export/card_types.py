"""The export card's vocabulary: file names, format, the limits every record is held to, the one
error type, and the checked encoder specs (2D timm, 3D medmae).

Split out of :mod:`medmae.export.card` (issue 19) so every checking module (encoder section,
preprocessing values, fine-tuning records) shares one definition of these without importing each
other; it imports nothing from medmae. Import these names from :mod:`medmae.export.card`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

CARD_FORMAT = 1
WEIGHTS_NAME = "encoder.safetensors"
CARD_NAME = "encoder.json"

#: Encoder size keys a card may pass to ``timm.create_model`` (and their accepted Python types).
ENCODER_KWARGS: dict[str, type | tuple[type, ...]] = {
    "embed_dim": int,
    "depth": int,
    "num_heads": int,
    "mlp_ratio": (int, float),
    "patch_size": int,
    "qkv_bias": bool,
    "drop_path_rate": (int, float),
}
#: Largest weights file a card may point at (a ViT-Giant is ~4 GB in fp32).
MAX_WEIGHTS_BYTES = 16 * 1024**3
#: Sanity limits: a record beyond them is corrupt or hostile, not a real encoder or fine-tuning run.
#: ``img_size`` bounds every side (encoder and ``preprocessing.image_size`` / ``volume.size``),
#: ``voxels`` the pixels (2D) or voxels (3D) of one encoder input, ``tokens`` the patches of one input,
#: ``params`` an encoder's parameter count (as many fp32 numbers as the largest weights file holds),
#: ``num_classes`` a segmentation's classes (masks are uint8), ``feature_size`` the decoder width.
LIMITS = {
    "in_chans": 64,
    "img_size": 4096,
    "patch_size": 64,
    "embed_dim": 8192,
    "depth": 256,
    "num_heads": 256,
    "voxels": 4096 * 4096,
    "tokens": 65536,
    "params": MAX_WEIGHTS_BYTES // 4,
    "num_classes": 256,
    "feature_size": 256,
}
#: Deepest nesting of JSON a card may have (a real card nests 5 levels); checked before parsing.
MAX_JSON_DEPTH = 64
#: Largest card file (a real one is a few kB).
MAX_CARD_BYTES = 4 * 1024**2


#: ``encoder.arch`` of a 3D export (medmae's own ViT over cubic patches; timm has no 3D ViT)
ARCH_3D = "medmae_vit3d"
#: what to call instead when a 2D loader is given a 3D export
LOADERS_3D = "medmae.export.build_unetr3d_from_export(DIR, out_channels) or load_vit3d(DIR)"


class CardError(ValueError):
    """The export card is missing, unreadable or has a field with a wrong type or value."""


@dataclass(frozen=True)
class EncoderSpec:
    """The checked ``encoder`` section: everything needed to rebuild the timm ViT (no weights)."""

    arch: str
    kwargs: dict[str, Any]
    in_chans: int
    img_size: tuple[int, int]
    patch_size: int
    embed_dim: int


@dataclass(frozen=True)
class EncoderSpec3D:
    """The checked ``encoder`` section of a 3D export: everything needed to rebuild the MONAI ViT."""

    arch: str
    in_chans: int
    img_size: tuple[int, int, int]
    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float
    cls_token: bool
    qkv_bias: bool
    layer_norm_eps: float
    spatial_dims: int = 3

    @property
    def mlp_dim(self) -> int:
        """Hidden width of the blocks' MLP (timm's ``int(embed_dim * mlp_ratio)``)."""
        return int(self.embed_dim * self.mlp_ratio)
