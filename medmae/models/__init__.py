"""MAE model: pure patch/mask/position functions and the MaskedAutoencoder around a timm ViT."""

from medmae.models.mae import MaskedAutoencoder, as_hw
from medmae.models.mae_base import MAEBase, MAEOutput
from medmae.models.masking import Masking, random_masking, visible_count
from medmae.models.options import MAEOptions
from medmae.models.patches import grid_shape, patchify, unpatchify
from medmae.models.pos_embed import sincos_pos_embed_2d
from medmae.models.variants import (
    MAE_VARIANTS,
    VARIANTS,
    MAEVariant,
    build_mae,
    create_mae,
    mae_variant,
    mae_vit_base_patch16,
    mae_vit_huge_patch16,
    mae_vit_large_patch16,
    mae_vit_small_patch16,
    mae_vit_tiny_patch16,
    variant_names,
)

__all__ = [
    "MAE_VARIANTS",
    "VARIANTS",
    "MAEBase",
    "MAEOptions",
    "MAEOutput",
    "MAEVariant",
    "MaskedAutoencoder",
    "Masking",
    "as_hw",
    "build_mae",
    "create_mae",
    "grid_shape",
    "mae_vit_base_patch16",
    "mae_vit_huge_patch16",
    "mae_vit_large_patch16",
    "mae_vit_small_patch16",
    "mae_vit_tiny_patch16",
    "mae_variant",
    "patchify",
    "random_masking",
    "sincos_pos_embed_2d",
    "unpatchify",
    "variant_names",
    "visible_count",
]

# 3D (volumetric) MAE: appended after the 2D exports, which it reuses (masking, MAEOutput).
from medmae.models.mae3d import (  # noqa: E402
    MaskedAutoencoder3D,
    ViTEncoder3D,
    grid_shape3d,
    patchify3d,
    unpatchify3d,
)
from medmae.models.pos_embed3d import sincos_pos_embed_3d  # noqa: E402
from medmae.models.variants import MAE3D_VARIANTS, create_mae3d  # noqa: E402

__all__ += [
    "MAE3D_VARIANTS",
    "MaskedAutoencoder3D",
    "ViTEncoder3D",
    "create_mae3d",
    "grid_shape3d",
    "patchify3d",
    "sincos_pos_embed_3d",
    "unpatchify3d",
]
