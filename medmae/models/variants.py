"""Named MAE sizes, 2D and 3D, in one registry: thin factories, as timm registers its ViTs.

:data:`VARIANTS` maps every variant name to a :class:`MAEVariant`: its spatial dimensionality (2: a
timm ViT on planes, :class:`MaskedAutoencoder`; 3: medmae's ViT on volumes, :class:`MaskedAutoencoder3D`)
and the encoder size that makes it that variant. :func:`mae_variant` is the one lookup (its error names
the known variants); ``mae_variant(name).create(...)`` builds the model. :data:`MAE_VARIANTS` and
:data:`MAE3D_VARIANTS` are the 2D and 3D halves of the registry in their older shapes.

Every size field can be overridden (that is how configs change depth, width or patch size); the 2D
decoder is the paper's 512-wide, 8-deep, 16-head one and the 3D decoder 384x4x12 unless overridden.

Example::

    model = mae_variant("mae3d_vit_tiny_patch16").create(img_size=96, depth=2)  # a MaskedAutoencoder3D
    assert mae_variant("mae_vit_base_patch16").spatial_dims == 2
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from medmae.models.mae import MaskedAutoencoder
from medmae.models.mae3d import MaskedAutoencoder3D
from medmae.models.mae_base import MAEBase

#: largest width / head count / patch accepted (ViT-22B is 6144 wide): beyond it a typo, not a model
MAX_WIDTH = 8192
#: largest number of transformer blocks accepted in the encoder or decoder
MAX_DEPTH = 256


@dataclass(frozen=True)
class MAEVariant:
    """One named MAE size.

    ``arch``: the timm encoder a 2D variant wraps (``None`` for 3D: :class:`ViTEncoder3D`);
    ``encoder``: the encoder arguments that make it this variant (2D: overrides of the timm arch;
    3D: the whole encoder size).
    """

    name: str
    spatial_dims: int
    arch: str | None
    encoder: Mapping[str, Any]

    def create(self, **kwargs: Any) -> MAEBase:
        """Build this variant: :func:`create_mae` (2D) or :func:`create_mae3d` (3D) with ``kwargs``."""
        return (create_mae3d if self.spatial_dims == 3 else create_mae)(self.name, **kwargs)


def _registry(*variants: MAEVariant) -> dict[str, MAEVariant]:
    return {variant.name: variant for variant in variants}


#: variant name -> :class:`MAEVariant`, 2D and 3D (names are stored in checkpoints: never rename one)
VARIANTS: dict[str, MAEVariant] = _registry(
    MAEVariant("mae_vit_tiny_patch16", 2, "vit_tiny_patch16_224", {}),
    MAEVariant("mae_vit_small_patch16", 2, "vit_small_patch16_224", {}),
    MAEVariant("mae_vit_base_patch16", 2, "vit_base_patch16_224", {}),
    MAEVariant("mae_vit_large_patch16", 2, "vit_large_patch16_224", {}),
    # timm registers the huge ViT with 14-pixel patches; MAE's huge/16 only changes the patch.
    MAEVariant("mae_vit_huge_patch16", 2, "vit_huge_patch14_224", {"patch_size": 16}),
    # 3D: all 16-voxel patches, the only patch MONAI's UNETR takes
    MAEVariant("mae3d_vit_tiny_patch16", 3, None, {"embed_dim": 192, "depth": 12, "num_heads": 3, "patch_size": 16}),
    MAEVariant("mae3d_vit_small_patch16", 3, None, {"embed_dim": 384, "depth": 12, "num_heads": 6, "patch_size": 16}),
    MAEVariant("mae3d_vit_base_patch16", 3, None, {"embed_dim": 768, "depth": 12, "num_heads": 12, "patch_size": 16}),
)


def variant_names(spatial_dims: int | None = None) -> list[str]:
    """The registered variant names (of ``spatial_dims`` only, if given), sorted."""
    return sorted(name for name, v in VARIANTS.items() if spatial_dims in (None, v.spatial_dims))


def mae_variant(name: str, spatial_dims: int | None = None, *, field: str | None = None) -> MAEVariant:
    """The registered variant ``name`` (and of ``spatial_dims``, if given).

    An unknown name raises ``ValueError`` naming ``field`` (default: "MAE variant", "3D MAE variant")
    and the known variants: those of ``spatial_dims``, or the 2D and the 3D ones.
    """
    variant = VARIANTS.get(name)
    if variant is not None and spatial_dims in (None, variant.spatial_dims):
        return variant
    if spatial_dims is None:
        known = f"choose a 2D variant {variant_names(2)} or a 3D variant {variant_names(3)}"
    else:
        known = f"choose one of {variant_names(spatial_dims)}"
    field = field or ("3D MAE variant" if spatial_dims == 3 else "MAE variant")
    raise ValueError(f"unknown {field} {name!r}; {known}")


#: the 2D half of :data:`VARIANTS`: variant name -> (timm encoder arch, encoder overrides)
MAE_VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    name: (str(v.arch), dict(v.encoder)) for name, v in VARIANTS.items() if v.spatial_dims == 2
}
#: the 3D half of :data:`VARIANTS`: variant name -> encoder size
MAE3D_VARIANTS: dict[str, dict[str, int]] = {
    name: dict(v.encoder) for name, v in VARIANTS.items() if v.spatial_dims == 3
}


def create_mae(
    variant: str,
    *,
    in_chans: int = 1,
    img_size: int | tuple[int, int] = 224,
    mask_ratio: float = 0.75,
    norm_pix_loss: bool = True,
    embed_dim: int | None = None,
    depth: int | None = None,
    num_heads: int | None = None,
    mlp_ratio: float | None = None,
    patch_size: int | None = None,
    drop_path_rate: float = 0.0,
    decoder_embed_dim: int = 512,
    decoder_depth: int = 8,
    decoder_num_heads: int = 16,
    decoder_mlp_ratio: float = 4.0,
) -> MaskedAutoencoder:
    """Build a named MAE variant; ``None`` keeps the variant's own encoder size.

    Sizes are checked before anything is allocated: widths in ``[1, MAX_WIDTH]``, depths in
    ``[1, MAX_DEPTH]``, heads >= 1, ratios > 0; a bad value raises ``ValueError`` naming the field.
    """
    spec = mae_variant(variant, 2)
    _check_sizes(
        embed_dim=(embed_dim, MAX_WIDTH),
        depth=(depth, MAX_DEPTH),
        num_heads=(num_heads, MAX_WIDTH),
        patch_size=(patch_size, MAX_WIDTH),
        decoder_embed_dim=(decoder_embed_dim, MAX_WIDTH),
        decoder_depth=(decoder_depth, MAX_DEPTH),
        decoder_num_heads=(decoder_num_heads, MAX_WIDTH),
        in_chans=(in_chans, MAX_WIDTH),
    )
    for name, ratio in (("mlp_ratio", mlp_ratio), ("decoder_mlp_ratio", decoder_mlp_ratio)):
        if ratio is not None and (isinstance(ratio, bool) or not isinstance(ratio, int | float) or not 0 < ratio <= 64):
            raise ValueError(f"{name} must be a number in (0, 64], got {ratio!r}")
    if isinstance(drop_path_rate, bool) or not isinstance(drop_path_rate, int | float) or not 0 <= drop_path_rate < 1:
        raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate!r}")
    arch, encoder_kwargs = str(spec.arch), dict(spec.encoder)
    overrides = {
        "embed_dim": embed_dim,
        "depth": depth,
        "num_heads": num_heads,
        "mlp_ratio": mlp_ratio,
        "patch_size": patch_size,
    }
    encoder_kwargs = {**encoder_kwargs, **{k: v for k, v in overrides.items() if v is not None}}
    if drop_path_rate:
        encoder_kwargs["drop_path_rate"] = drop_path_rate
    return MaskedAutoencoder(
        arch,
        in_chans=in_chans,
        img_size=img_size,
        mask_ratio=mask_ratio,
        norm_pix_loss=norm_pix_loss,
        decoder_embed_dim=decoder_embed_dim,
        decoder_depth=decoder_depth,
        decoder_num_heads=decoder_num_heads,
        decoder_mlp_ratio=decoder_mlp_ratio,
        encoder_kwargs=encoder_kwargs,
    )


def create_mae3d(
    variant: str,
    *,
    in_chans: int = 1,
    img_size: int | Sequence[int] = 96,
    mask_ratio: float = 0.75,
    norm_pix_loss: bool = True,
    cls_token: bool = True,
    embed_dim: int | None = None,
    depth: int | None = None,
    num_heads: int | None = None,
    patch_size: int | None = None,
    mlp_ratio: float = 4.0,
    drop_path_rate: float = 0.0,
    decoder_embed_dim: int = 384,
    decoder_depth: int = 4,
    decoder_num_heads: int = 12,
    decoder_mlp_ratio: float = 4.0,
) -> MaskedAutoencoder3D:
    """Build a named 3D MAE size; ``None`` keeps the variant's encoder size. The decoder is 384x4x12."""
    spec = mae_variant(variant, 3)
    overrides = {"embed_dim": embed_dim, "depth": depth, "num_heads": num_heads, "patch_size": patch_size}
    size = {**spec.encoder, **{k: v for k, v in overrides.items() if v is not None}}
    return MaskedAutoencoder3D(
        in_chans=in_chans,
        img_size=img_size,
        mlp_ratio=mlp_ratio,
        cls_token=cls_token,
        mask_ratio=mask_ratio,
        norm_pix_loss=norm_pix_loss,
        drop_path_rate=drop_path_rate,
        decoder_embed_dim=decoder_embed_dim,
        decoder_depth=decoder_depth,
        decoder_num_heads=decoder_num_heads,
        decoder_mlp_ratio=decoder_mlp_ratio,
        **size,
    )


def _check_sizes(**fields: tuple[Any, int]) -> None:
    """Each field is None (keep the variant's) or an int in ``[1, limit]``."""
    for name, (value, limit) in fields.items():
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
            raise ValueError(f"{name} must be an int in [1, {limit}], got {value!r}")


def _factory(variant: str) -> Callable[..., MaskedAutoencoder]:
    def build(**kwargs: Any) -> MaskedAutoencoder:
        return create_mae(variant, **kwargs)

    build.__name__ = variant
    build.__doc__ = f"MAE with the timm encoder {VARIANTS[variant].arch!r}; see :func:`create_mae`."
    return build


mae_vit_tiny_patch16 = _factory("mae_vit_tiny_patch16")
mae_vit_small_patch16 = _factory("mae_vit_small_patch16")
mae_vit_base_patch16 = _factory("mae_vit_base_patch16")
mae_vit_large_patch16 = _factory("mae_vit_large_patch16")
mae_vit_huge_patch16 = _factory("mae_vit_huge_patch16")
