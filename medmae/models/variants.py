"""Named MAE sizes, 2D and 3D, in one registry: thin factories, as timm registers its ViTs.

:data:`VARIANTS` maps every variant name to a :class:`MAEVariant`: its spatial dimensionality (2: a
timm ViT on planes, :class:`MaskedAutoencoder`; 3: medmae's ViT on volumes, :class:`MaskedAutoencoder3D`)
and the encoder size that makes it that variant. :func:`mae_variant` is the one lookup (its error names
the known variants); ``mae_variant(name).create(...)`` or :func:`build_mae` (name,
:class:`MAEOptions`) builds the model. :data:`MAE_VARIANTS` and :data:`MAE3D_VARIANTS` are the 2D and
3D halves of the registry in their older shapes.

Every size field can be overridden (that is how configs change depth, width or patch size); the 2D
decoder is the paper's 512-wide, 8-deep, 16-head one and the 3D decoder 384x4x12 unless overridden.

Example::

    model = mae_variant("mae3d_vit_tiny_patch16").create(img_size=96, depth=2)  # a MaskedAutoencoder3D
    assert mae_variant("mae_vit_base_patch16").spatial_dims == 2
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from medmae.models.mae import MaskedAutoencoder, as_hw
from medmae.models.mae3d import MaskedAutoencoder3D
from medmae.models.mae_base import MAEBase
from medmae.models.options import FIELD_PREFIX, MAX_DEPTH, MAX_WIDTH, MAEOptions  # noqa: F401 - re-exported


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

    def create(self, options: MAEOptions | None = None, **kwargs: Any) -> MAEBase:
        """Build this variant: :func:`create_mae` (2D) or :func:`create_mae3d` (3D) with ``options`` /
        :class:`MAEOptions` fields as ``kwargs``."""
        return (create_mae3d if self.spatial_dims == 3 else create_mae)(self.name, options, **kwargs)


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


def build_mae(
    variant: str,
    options: MAEOptions | Mapping[str, Any] | None = None,
    *,
    cls_token: bool = True,
    field: str | None = None,
) -> MAEBase:
    """Build the variant named ``variant`` (2D or 3D) with ``options`` (:class:`MAEOptions`).

    The one builder behind :meth:`MAEVariant.create`, :func:`create_mae` and :func:`create_mae3d`.
    ``cls_token`` is the 3D encoder's (2D: timm's ViTs always have one); ``field``: how an unknown
    variant is named in the error (see :func:`mae_variant`).
    """
    spec = mae_variant(variant, field=field)
    opts = MAEOptions.of(options)
    if spec.spatial_dims == 3:
        size = opts.img_size
        if not isinstance(size, int) and len(size) != 3:
            raise ValueError(
                f"{FIELD_PREFIX}.img_size must be S or [Z, Y, X] for the 3D variant {variant}, got {list(size)}"
            )
        overrides = {"embed_dim": opts.embed_dim, "depth": opts.depth, "num_heads": opts.num_heads,
                     "patch_size": opts.patch_size}  # fmt: skip
        encoder = {**spec.encoder, **{k: v for k, v in overrides.items() if v is not None}}
        if opts.hog_weight:
            raise ValueError(f"{FIELD_PREFIX}.hog_weight is 2D only (HOG of planes); {variant} is a 3D variant: set 0")
        return MaskedAutoencoder3D(
            in_chans=opts.in_chans,
            img_size=size,
            mlp_ratio=opts.mlp_ratio if opts.mlp_ratio is not None else 4.0,
            cls_token=cls_token,
            mask_ratio=opts.mask_ratio,
            norm_pix_loss=opts.norm_pix_loss,
            drop_path_rate=opts.drop_path_rate,
            decoder_embed_dim=opts.decoder_embed_dim,
            decoder_depth=opts.decoder_depth,
            decoder_num_heads=opts.decoder_num_heads,
            decoder_mlp_ratio=opts.decoder_mlp_ratio,
            **encoder,
        )
    if not cls_token:
        raise ValueError(f"cls_token=False is for 3D variants; {variant} is a timm ViT with a class token")
    overrides = {"embed_dim": opts.embed_dim, "depth": opts.depth, "num_heads": opts.num_heads,
                 "mlp_ratio": opts.mlp_ratio, "patch_size": opts.patch_size}  # fmt: skip
    encoder_kwargs = {**spec.encoder, **{k: v for k, v in overrides.items() if v is not None}}
    if opts.drop_path_rate:
        encoder_kwargs["drop_path_rate"] = opts.drop_path_rate
    return MaskedAutoencoder(
        str(spec.arch),
        in_chans=opts.in_chans,
        img_size=as_hw(opts.img_size),  # type: ignore[arg-type]
        mask_ratio=opts.mask_ratio,
        norm_pix_loss=opts.norm_pix_loss,
        decoder_embed_dim=opts.decoder_embed_dim,
        decoder_depth=opts.decoder_depth,
        decoder_num_heads=opts.decoder_num_heads,
        decoder_mlp_ratio=opts.decoder_mlp_ratio,
        encoder_kwargs=encoder_kwargs,
        hog_weight=opts.hog_weight,
    )


def create_mae(variant: str, options: MAEOptions | None = None, **fields: Any) -> MaskedAutoencoder:
    """Build a named 2D MAE variant from ``options`` and/or :class:`MAEOptions` fields as keywords
    (``create_mae("mae_vit_tiny_patch16", img_size=32, depth=2)``); ``None`` keeps the variant's size.

    Sizes are checked before anything is allocated (:class:`MAEOptions`): widths in ``[1, MAX_WIDTH]``,
    depths in ``[1, MAX_DEPTH]``, ratios > 0; a bad value raises ``ValueError`` naming the field.
    """
    mae_variant(variant, 2)
    return build_mae(variant, MAEOptions.of(options, **fields))  # type: ignore[return-value]


#: what :func:`create_mae3d` uses where neither ``options`` nor a keyword says: the 3D decoder is 384x4x12
MAE3D_DEFAULTS: dict[str, Any] = {"img_size": 96, "decoder_embed_dim": 384, "decoder_depth": 4, "decoder_num_heads": 12}


def create_mae3d(
    variant: str, options: MAEOptions | None = None, *, cls_token: bool = True, **fields: Any
) -> MaskedAutoencoder3D:
    """Build a named 3D MAE size from ``options`` and/or :class:`MAEOptions` fields as keywords; ``None``
    keeps the variant's encoder size. Without ``options`` the decoder is 384x4x12 and the volume 96^3
    (:data:`MAE3D_DEFAULTS`)."""
    mae_variant(variant, 3)
    opts = MAEOptions.of(options, **fields) if options is not None else MAEOptions.of(MAE3D_DEFAULTS, **fields)
    return build_mae(variant, opts, cls_token=cls_token)  # type: ignore[return-value]


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
