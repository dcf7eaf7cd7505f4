"""Volumetric masked autoencoder (MAE on 3D scans): cubic patches, fixed 3D sin-cos positions.

The 2D model wraps a timm ``VisionTransformer``; timm has no 3D ViT, so the encoder here is our own
:class:`ViTEncoder3D`: a ``Conv3d`` patch embedding (kernel = stride = patch) and timm ``Block``s, whose
attention is fused (``F.scaled_dot_product_attention``). Its ``state_dict`` uses timm's names
(``patch_embed.proj``, ``cls_token``, ``pos_embed``, ``blocks.i.*``, ``norm``), so the explicit key map
of the 2D export carries it into MONAI's ``ViT(spatial_dims=3)`` / ``UNETR`` (``medmae.export.unetr3d``).

Choices, and why:

- LayerNorm ``eps=1e-5`` (PyTorch's and MONAI's default, not timm's 1e-6): a stock MONAI ViT/UNETR then
  computes the same function as the pretrained encoder without patching its norms.
- Class token: kept by default (``cls_token=True``, position zero), as in the 2D model, so the encoder
  attends the same way in pretraining and after export (MONAI gets it through ``EncoderUNETR``).
  ``cls_token=False`` gives an encoder that loads into a stock ``UNETR`` with no subclass.
- Positions are fixed buffers (not Parameters) in encoder and decoder; see ``pos_embed3d`` for the
  layout (MONAI's own 3D sin-cos).
- Decoder: 384 wide, 4 blocks, 12 heads (head width 32, as the paper's 512/16 decoder). A 3D grid has
  many tokens (96³ / 16³ = 216, 160²x96 / 16³ = 600) and the decoder runs on all of them, so it is kept
  narrower and shallower than the paper's 512x8; it is a setting, not a measured optimum.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
from timm.models.vision_transformer import Block
from torch import nn

from medmae.models.mae_base import MAEBase
from medmae.models.masking import random_masking, visible_count
from medmae.models.pos_embed3d import sincos_pos_embed_3d

#: LayerNorm epsilon of encoder and decoder: MONAI's (and PyTorch's) default, see the module docstring
LAYER_NORM_EPS = 1e-5

Size3D = tuple[int, int, int]


def as_size3d(img_size: int | Sequence[int]) -> Size3D:
    """Normalise a volume size given as ``96`` or ``(S0, S1, S2)`` to a 3-tuple."""
    if isinstance(img_size, int) and not isinstance(img_size, bool):
        return img_size, img_size, img_size
    if isinstance(img_size, str) or not isinstance(img_size, Sequence) or len(img_size) != 3:
        raise ValueError(f"img_size must be an int or (S0, S1, S2), got {img_size!r}")
    if any(isinstance(s, bool) or not isinstance(s, int) for s in img_size):
        raise ValueError(f"img_size must hold ints, got {img_size!r}")
    return int(img_size[0]), int(img_size[1]), int(img_size[2])


def grid_shape3d(img_size: Sequence[int], patch_size: int) -> Size3D:
    """Patch grid of a volume; ValueError unless every side is a positive multiple of the patch."""
    if isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size < 1:
        raise ValueError(f"patch_size must be an int >= 1, got {patch_size!r}")
    size = as_size3d(tuple(img_size))
    if any(s < patch_size or s % patch_size for s in size):
        raise ValueError(
            f"img_size {size} is not divisible by patch_size {patch_size}: every side must be a multiple of it"
        )
    return size[0] // patch_size, size[1] // patch_size, size[2] // patch_size


def patchify3d(vols: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, S0, S1, S2) -> (B, g0*g1*g2, p*p*p*C): row-major grid order, (p, p, p, C) vectors."""
    if vols.ndim != 5:
        raise ValueError(f"expected volumes of shape (B, C, S0, S1, S2), got {tuple(vols.shape)}")
    b, c = vols.shape[:2]
    g0, g1, g2 = grid_shape3d(vols.shape[-3:], patch_size)
    p = patch_size
    x = vols.reshape(b, c, g0, p, g1, p, g2, p)
    x = x.permute(0, 2, 4, 6, 3, 5, 7, 1)  # b, g0, g1, g2, p, p, p, c
    return x.reshape(b, g0 * g1 * g2, p**3 * c)


def unpatchify3d(patches: torch.Tensor, patch_size: int, grid: Size3D, channels: int) -> torch.Tensor:
    """(B, g0*g1*g2, p*p*p*C) -> (B, C, g0*p, g1*p, g2*p); the inverse of :func:`patchify3d`."""
    b, n, d = patches.shape
    g0, g1, g2 = grid
    p = patch_size
    if n != g0 * g1 * g2 or d != p**3 * channels:
        raise ValueError(
            f"patches of shape {tuple(patches.shape)} do not match grid {grid}, patch {p}, channels {channels}"
        )
    x = patches.reshape(b, g0, g1, g2, p, p, p, channels)
    x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)  # b, c, g0, p, g1, p, g2, p
    return x.reshape(b, channels, g0 * p, g1 * p, g2 * p)


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _check_width(dim_name: str, dim: int, heads_name: str, heads: int) -> None:
    """Width a multiple of 6 (3D sin-cos) and of the head count."""
    _check_int(dim_name, dim, 6)
    _check_int(heads_name, heads, 1)
    if dim % 6:
        raise ValueError(f"{dim_name}={dim} must be a multiple of 6 for 3D sin-cos positions")
    if dim % heads:
        raise ValueError(f"{dim_name}={dim} must be divisible by {heads_name}={heads}")


def _check_ratio(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 64:
        raise ValueError(f"{name} must be a number in (0, 64], got {value!r}")


def _blocks(dim: int, depth: int, heads: int, mlp_ratio: float, drop_path_rate: float = 0.0) -> nn.Sequential:
    """timm Blocks (fused attention); stochastic depth rising linearly to ``drop_path_rate`` (as timm)."""
    norm = partial(nn.LayerNorm, eps=LAYER_NORM_EPS)
    rates = [drop_path_rate * i / max(1, depth - 1) for i in range(depth)]
    return nn.Sequential(
        *[Block(dim, heads, mlp_ratio=mlp_ratio, qkv_bias=True, norm_layer=norm, drop_path=r) for r in rates]
    )


class PatchEmbed3D(nn.Module):
    """Non-overlapping cubic patches to tokens: ``Conv3d`` with kernel = stride = patch."""

    def __init__(self, in_chans: int, embed_dim: int, patch_size: int) -> None:
        super().__init__()
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, vols: torch.Tensor) -> torch.Tensor:
        return self.proj(vols).flatten(2).transpose(1, 2)


class ViTEncoder3D(nn.Module):
    """Plain ViT over cubic patches, with timm parameter names so the 2D export key map applies.

    ``forward`` is the unmasked encoder (cls + all patches, final norm); the MAE runs the same pieces
    on visible tokens only. Sizes are checked by :class:`MaskedAutoencoder3D`.
    """

    def __init__(
        self,
        in_chans: int,
        img_size: Size3D,
        patch_size: int,
        embed_dim: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float,
        cls_token: bool,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        self.in_chans, self.img_size, self.patch_size = in_chans, img_size, patch_size
        self.embed_dim, self.num_heads, self.mlp_ratio = embed_dim, num_heads, mlp_ratio
        self.grid = grid_shape3d(img_size, patch_size)
        self.num_prefix_tokens = 1 if cls_token else 0
        self.patch_embed = PatchEmbed3D(in_chans, embed_dim, patch_size)
        if cls_token:
            self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        else:
            self.register_parameter("cls_token", None)
        # persistent: exported with the weights, so the card's state carries the positions MONAI needs
        self.register_buffer("pos_embed", sincos_pos_embed_3d(embed_dim, self.grid, cls_token=cls_token))
        self.blocks = _blocks(embed_dim, depth, num_heads, mlp_ratio, drop_path_rate)
        self.norm = nn.LayerNorm(embed_dim, eps=LAYER_NORM_EPS)

    @property
    def depth(self) -> int:
        return len(self.blocks)

    def embed(self, vols: torch.Tensor) -> torch.Tensor:
        """Patch tokens with their positions, (B, N, D), no class token yet."""
        return self.patch_embed(vols) + self.pos_embed[:, self.num_prefix_tokens :].to(vols.dtype)

    def prepend_cls(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.cls_token is None:
            return tokens
        cls = (self.cls_token + self.pos_embed[:, :1]).to(tokens.dtype).expand(tokens.shape[0], -1, -1)
        return torch.cat([cls, tokens], dim=1)

    def forward_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Blocks and final norm over (cls +) the given patch tokens."""
        return self.norm(self.blocks(self.prepend_cls(tokens)))

    def forward(self, vols: torch.Tensor) -> torch.Tensor:
        return self.forward_tokens(self.embed(vols))

    def forward_intermediates(self, vols: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``(normed output, [output of each block])``, the pair MONAI's ``ViT.forward`` returns."""
        x = self.prepend_cls(self.embed(vols))
        hidden = []
        for block in self.blocks:
            x = block(x)
            hidden.append(x)
        return self.norm(x), hidden


class MaskedAutoencoder3D(MAEBase):
    """MAE over volumes: :class:`ViTEncoder3D` on visible patches, light decoder, masked MSE in fp32.

    Args:
        in_chans: channels of the input volume (1 for a CT/MR scan, k for k co-registered sequences).
        img_size: crop size ``S`` or ``(S0, S1, S2)``; every side a multiple of ``patch_size``.
        patch_size: side of the cubic patch (MONAI's UNETR takes 16).
        embed_dim, depth, num_heads, mlp_ratio: encoder size; ``embed_dim`` a multiple of 6.
        cls_token: prepend a class token (position zero); see the module docstring.
        mask_ratio: fraction of patches removed per sample, in [0, 1), leaving at least one visible.
        norm_pix_loss: regress per-patch normalised voxels (mean 0, variance 1 within each patch).
        drop_path_rate: stochastic depth of the encoder blocks (0 in the MAE recipe).
        decoder_embed_dim, decoder_depth, decoder_num_heads, decoder_mlp_ratio: decoder size.

    Example::

        model = MaskedAutoencoder3D(img_size=(32, 32, 16), patch_size=8, embed_dim=48, depth=2, num_heads=4)
        out = model(torch.randn(2, 1, 32, 32, 16), generator=torch.Generator().manual_seed(0))
        out.loss.backward()
    """

    def __init__(
        self,
        in_chans: int = 1,
        img_size: int | Sequence[int] = 96,
        patch_size: int = 16,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        cls_token: bool = True,
        mask_ratio: float = 0.75,
        norm_pix_loss: bool = True,
        drop_path_rate: float = 0.0,
        decoder_embed_dim: int = 384,
        decoder_depth: int = 4,
        decoder_num_heads: int = 12,
        decoder_mlp_ratio: float = 4.0,
    ) -> None:
        super().__init__()
        _check_int("in_chans", in_chans, 1)
        self.img_size = as_size3d(img_size)
        grid = grid_shape3d(self.img_size, patch_size)
        _check_width("embed_dim", embed_dim, "num_heads", num_heads)
        _check_width("decoder_embed_dim", decoder_embed_dim, "decoder_num_heads", decoder_num_heads)
        _check_int("depth", depth, 1)
        _check_int("decoder_depth", decoder_depth, 1)
        _check_ratio("mlp_ratio", mlp_ratio)
        _check_ratio("decoder_mlp_ratio", decoder_mlp_ratio)
        rate = drop_path_rate
        if isinstance(rate, bool) or not isinstance(rate, int | float) or not 0 <= rate < 1:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate!r}")
        if isinstance(mask_ratio, bool) or not isinstance(mask_ratio, int | float):
            raise ValueError(f"mask_ratio must be a number in [0, 1), got {mask_ratio!r}")
        visible_count(grid[0] * grid[1] * grid[2], mask_ratio)  # names mask_ratio if no patch stays visible
        self.in_chans, self.patch_size, self.grid = in_chans, patch_size, grid
        self.mask_ratio, self.norm_pix_loss = float(mask_ratio), norm_pix_loss

        self.encoder = ViTEncoder3D(
            in_chans, self.img_size, patch_size, embed_dim, depth, num_heads, mlp_ratio, cls_token, drop_path_rate
        )
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.register_buffer(
            "decoder_pos_embed", sincos_pos_embed_3d(decoder_embed_dim, grid, cls_token=cls_token), persistent=False
        )
        self.decoder_blocks = _blocks(decoder_embed_dim, decoder_depth, decoder_num_heads, decoder_mlp_ratio)
        self.decoder_norm = nn.LayerNorm(decoder_embed_dim, eps=LAYER_NORM_EPS)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size**3 * in_chans)
        self._init_weights()

    def _init_weights(self) -> None:
        """Official MAE init: xavier Linear and patch embedding (as a Linear), tokens N(0, 0.02)."""
        w = self.encoder.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.encoder.patch_embed.proj.bias)
        if self.encoder.cls_token is not None:
            nn.init.normal_(self.encoder.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        self._init_linear_and_norms()

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2]

    def patchify(self, vols: torch.Tensor) -> torch.Tensor:
        return patchify3d(vols, self.patch_size)

    def unpatchify(self, patches: torch.Tensor) -> torch.Tensor:
        return unpatchify3d(patches, self.patch_size, self.grid, self.in_chans)

    def forward_encoder(
        self, vols: torch.Tensor, mask_ratio: float, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Embed, mask, run the encoder on (cls +) visible tokens: ``(latent, mask (B, N), ids_restore)``."""
        self._check_input(vols)
        masking = random_masking(self.encoder.embed(vols), mask_ratio, generator)
        return self.encoder.forward_tokens(masking.visible), masking.mask, masking.ids_restore

    def encoder_config(self) -> dict[str, Any]:
        """Everything needed to rebuild this encoder, or the matching MONAI ViT/UNETR (no weights)."""
        enc = self.encoder
        return {
            "arch": "medmae_vit3d",
            "spatial_dims": 3,
            "in_chans": self.in_chans,
            "img_size": list(self.img_size),
            "patch_size": self.patch_size,
            "embed_dim": enc.embed_dim,
            "depth": enc.depth,
            "num_heads": enc.num_heads,
            "mlp_ratio": enc.mlp_ratio,
            "cls_token": enc.cls_token is not None,
            "qkv_bias": True,
            "layer_norm_eps": LAYER_NORM_EPS,
        }

    def _check_input(self, vols: torch.Tensor) -> None:
        if vols.ndim != 5 or vols.shape[1] != self.in_chans or tuple(vols.shape[-3:]) != self.img_size:
            raise ValueError(
                f"input of shape {tuple(vols.shape)} does not match the model: expected "
                f"(B, in_chans={self.in_chans}, {', '.join(map(str, self.img_size))})"
            )
