"""Named MAE sizes: thin factories over :class:`MaskedAutoencoder`, as timm registers its ViTs.

Every size field can be overridden (that is how configs change depth, width or patch size); the
decoder is the paper's 512-wide, 8-deep, 16-head one unless overridden.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from medmae.models.mae import MaskedAutoencoder

#: largest width / head count / patch accepted (ViT-22B is 6144 wide): beyond it a typo, not a model
MAX_WIDTH = 8192
#: largest number of transformer blocks accepted in the encoder or decoder
MAX_DEPTH = 256

#: variant name -> (timm encoder arch, encoder overrides that make it that variant)
MAE_VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "mae_vit_tiny_patch16": ("vit_tiny_patch16_224", {}),
    "mae_vit_small_patch16": ("vit_small_patch16_224", {}),
    "mae_vit_base_patch16": ("vit_base_patch16_224", {}),
    "mae_vit_large_patch16": ("vit_large_patch16_224", {}),
    # timm registers the huge ViT with 14-pixel patches; MAE's huge/16 only changes the patch.
    "mae_vit_huge_patch16": ("vit_huge_patch14_224", {"patch_size": 16}),
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
    if variant not in MAE_VARIANTS:
        raise ValueError(f"unknown MAE variant {variant!r}; choose one of {sorted(MAE_VARIANTS)}")
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
    arch, encoder_kwargs = MAE_VARIANTS[variant]
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
    build.__doc__ = f"MAE with the timm encoder {MAE_VARIANTS[variant][0]!r}; see :func:`create_mae`."
    return build


mae_vit_tiny_patch16 = _factory("mae_vit_tiny_patch16")
mae_vit_small_patch16 = _factory("mae_vit_small_patch16")
mae_vit_base_patch16 = _factory("mae_vit_base_patch16")
mae_vit_large_patch16 = _factory("mae_vit_large_patch16")
mae_vit_huge_patch16 = _factory("mae_vit_huge_patch16")
