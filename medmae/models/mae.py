"""Masked autoencoder around a plain timm VisionTransformer (He et al. 2021).

The encoder *is* a ``timm.models.vision_transformer.VisionTransformer`` built by ``timm.create_model``
with ``num_classes=0``; we only run its pieces on the visible tokens. Its ``state_dict`` therefore
loads strictly into the same timm model for fine-tuning, and with ``mask_ratio=0`` the encoder output
equals timm's ``forward_features``. Position embeddings of encoder and decoder are fixed 2D sin-cos.

The model is built from small named steps, as the official implementation:
``forward_encoder`` -> ``forward_decoder`` -> ``forward_loss``.
"""

from __future__ import annotations

from typing import Any

import timm
import torch
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from medmae.models.hog import HOGTarget
from medmae.models.mae_base import MAEBase
from medmae.models.masking import random_masking, visible_count
from medmae.models.patches import grid_shape, patchify, unpatchify
from medmae.models.pos_embed import sincos_pos_embed_2d


def as_hw(img_size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    """Normalise an image size given as ``224`` or ``(H, W)`` to ``(H, W)``."""
    if isinstance(img_size, int):
        return img_size, img_size
    size = tuple(int(s) for s in img_size)
    if len(size) != 2:
        raise ValueError(f"img_size must be an int or (H, W), got {img_size!r}")
    return size  # type: ignore[return-value]


class MaskedAutoencoder(MAEBase):
    """MAE with a timm ViT encoder and a light transformer decoder.

    Args:
        encoder_arch: timm model name of a VisionTransformer (e.g. ``vit_base_patch16_224``).
        in_chans: channels of the input (1 = grayscale, k = k adjacent slices for 2.5D).
        img_size: input size ``H`` or ``(H, W)``; both sides multiples of the patch size.
        mask_ratio: fraction of patches removed per sample, in [0, 1).
        norm_pix_loss: regress per-patch normalised pixels (mean 0, variance 1 within each patch).
        decoder_embed_dim: decoder width.
        decoder_depth: number of decoder transformer blocks.
        decoder_num_heads: decoder attention heads.
        decoder_mlp_ratio: decoder MLP hidden width / width.
        hog_weight: weight of a HOG target beside the pixels (MaskFeat; :mod:`medmae.models.hog`): a
            second linear head on the decoder predicts each masked patch's HOG; 0 (default) adds nothing.
        encoder_kwargs: overrides passed to ``timm.create_model`` (``embed_dim``, ``depth``,
            ``num_heads``, ``mlp_ratio``, ``patch_size``, ``drop_path_rate``, ...).

    Example::

        model = MaskedAutoencoder("vit_tiny_patch16_224", in_chans=3, img_size=(224, 192))
        out = model(torch.randn(2, 3, 224, 192))
        out.loss.backward()
    """

    def __init__(
        self,
        encoder_arch: str = "vit_base_patch16_224",
        in_chans: int = 1,
        img_size: int | tuple[int, int] = 224,
        mask_ratio: float = 0.75,
        norm_pix_loss: bool = True,
        decoder_embed_dim: int = 512,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        decoder_mlp_ratio: float = 4.0,
        encoder_kwargs: dict[str, Any] | None = None,
        hog_weight: float = 0.0,
    ) -> None:
        super().__init__()
        if in_chans < 1:
            raise ValueError(f"in_chans must be >= 1, got {in_chans}")
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
        _check_heads("decoder_embed_dim", decoder_embed_dim, "decoder_num_heads", decoder_num_heads)
        encoder_kwargs = dict(encoder_kwargs or {})
        for key in ("in_chans", "img_size", "num_classes"):
            if key in encoder_kwargs:
                raise ValueError(f"encoder_kwargs may not set {key!r}; it is a MaskedAutoencoder argument")
        self.img_size = as_hw(img_size)
        self.in_chans = in_chans
        self.mask_ratio = mask_ratio
        self.norm_pix_loss = norm_pix_loss
        self.encoder_arch = encoder_arch
        self.encoder_kwargs = encoder_kwargs

        self.encoder = _create_timm_encoder(encoder_arch, in_chans, self.img_size, encoder_kwargs)
        patch = self.encoder.patch_embed.patch_size
        if patch[0] != patch[1]:
            raise ValueError(f"only square patches are supported, got patch_size {patch}")
        self.patch_size = int(patch[0])
        self.grid = grid_shape(self.img_size, self.patch_size)
        visible_count(self.grid[0] * self.grid[1], mask_ratio)  # at least one visible patch, or ValueError
        embed_dim = self.encoder.embed_dim

        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.register_buffer(
            "decoder_pos_embed", sincos_pos_embed_2d(decoder_embed_dim, self.grid, cls_token=True), persistent=False
        )
        self.decoder_blocks = nn.Sequential(
            *[
                Block(decoder_embed_dim, decoder_num_heads, mlp_ratio=decoder_mlp_ratio, qkv_bias=True)
                for _ in range(decoder_depth)
            ]
        )
        self.decoder_norm = nn.LayerNorm(decoder_embed_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_embed_dim, self.patch_size**2 * in_chans)
        if not hog_weight >= 0:
            raise ValueError(f"hog_weight must be >= 0, got {hog_weight}")
        self.hog_weight = float(hog_weight)
        if self.hog_weight:
            self.hog = HOGTarget(in_chans, self.patch_size)
            self.decoder_pred_hog = nn.Linear(decoder_embed_dim, self.hog.dim)
        self._init_weights()

    # ------------------------------------------------------------------ init

    def _init_weights(self) -> None:
        """Official MAE init: fixed sin-cos positions, xavier Linear/patch-embed, tokens N(0, 0.02)."""
        enc = self.encoder
        enc.pos_embed.data.copy_(sincos_pos_embed_2d(enc.embed_dim, self.grid, cls_token=True))
        enc.pos_embed.requires_grad_(False)
        w = enc.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(enc.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        self._init_linear_and_norms()

    # ------------------------------------------------------------------ named steps

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        return patchify(imgs, self.patch_size)

    def unpatchify(self, patches: torch.Tensor) -> torch.Tensor:
        return unpatchify(patches, self.patch_size, self.grid, self.in_chans)

    def forward_encoder(
        self, imgs: torch.Tensor, mask_ratio: float, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Embed, mask, and run the timm blocks on cls + visible tokens.

        Returns ``(latent (B, 1+K, D), mask (B, N), ids_restore (B, N))``.
        """
        self._check_input(imgs)
        enc = self.encoder
        x = enc.patch_embed(imgs)
        x = x + enc.pos_embed[:, 1:, :]
        masking = random_masking(x, mask_ratio, generator)
        cls = (enc.cls_token + enc.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, masking.visible], dim=1)
        x = enc.pos_drop(x)
        x = enc.norm_pre(x)
        x = enc.blocks(x)
        x = enc.norm(x)
        return x, masking.mask, masking.ids_restore

    def encoder_config(self) -> dict[str, Any]:
        """Everything ``timm.create_model`` needs to rebuild this encoder (no weights)."""
        return {
            "arch": self.encoder_arch,
            "kwargs": dict(self.encoder_kwargs),
            "in_chans": self.in_chans,
            "img_size": list(self.img_size),
            "patch_size": self.patch_size,
            "embed_dim": self.encoder.embed_dim,
        }

    def _check_input(self, imgs: torch.Tensor) -> None:
        if imgs.ndim != 4 or imgs.shape[1] != self.in_chans or tuple(imgs.shape[-2:]) != self.img_size:
            raise ValueError(
                f"input of shape {tuple(imgs.shape)} does not match the model: expected "
                f"(B, in_chans={self.in_chans}, {self.img_size[0]}, {self.img_size[1]})"
            )


def _check_heads(dim_name: str, dim: int, heads_name: str, heads: int) -> None:
    if heads < 1 or dim % heads:
        raise ValueError(f"{dim_name}={dim} must be divisible by {heads_name}={heads}")


def _create_timm_encoder(
    arch: str, in_chans: int, img_size: tuple[int, int], kwargs: dict[str, Any]
) -> VisionTransformer:
    """Create the encoder through timm, with clear errors for impossible sizes."""
    if not timm.is_model(arch):
        raise ValueError(f"encoder arch {arch!r} is not a timm model name")
    if "patch_size" in kwargs:
        grid_shape(img_size, int(kwargs["patch_size"]))
    try:
        model = timm.create_model(
            arch, pretrained=False, in_chans=in_chans, img_size=img_size, num_classes=0, **kwargs
        )
    except AssertionError as e:  # timm asserts on sizes; turn them into a named ValueError
        raise ValueError(f"cannot build encoder {arch!r} with img_size={img_size}, {kwargs}: {e}") from e
    if not isinstance(model, VisionTransformer) or model.cls_token is None or model.no_embed_class:
        raise ValueError(
            f"encoder arch {arch!r} must be a timm VisionTransformer with a class token and "
            "position embeddings covering it (e.g. vit_base_patch16_224)"
        )
    if model.num_reg_tokens or model.dynamic_img_size:
        raise ValueError(f"encoder arch {arch!r}: register tokens / dynamic image size are not supported")
    grid_shape(img_size, int(model.patch_embed.patch_size[0]))
    return model

