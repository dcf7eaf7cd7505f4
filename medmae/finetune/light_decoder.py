"""The ``light`` segmentation decoder: UNETR's design over the encoder itself, for any patch, depth and 2D/3D.

MONAI's UNETR fixes 16-pixel patches and reads blocks 3, 6 and 9 of a 12-block ViT. This decoder keeps
its structure and generalises both limits, so every medmae encoder (e.g. the demo's patch-8, 4-block
ViT) can be fine-tuned for segmentation:

* the encoder is the exported network as is, no key map: the timm ``VisionTransformer`` (2D) or medmae's
  :class:`~medmae.models.mae3d.ViTEncoder3D` (3D; its MONAI blocks then run with ``spatial_dims=3``);
* a patch of ``p = 2**L`` pixels needs ``L`` upsampling stages from the token grid to the input;
* the ``L - 1`` intermediate resolutions get skips from encoder blocks spread evenly over the depth
  (deeper blocks feed coarser resolutions, as in UNETR), made with MONAI's ``UnetrPrUpBlock``;
* the full resolution gets a convolutional skip from the input (MONAI ``UnetrBasicBlock``), and each
  stage fuses with MONAI's ``UnetrUpBlock``;
* every tapped block output passes a fresh LayerNorm first (``tap_norm``): an MAE-pretrained residual
  stream carries a large shared offset (token RMS ~10x a random init's at blocks 3/6/9 here), which
  UNETR feeds its decoder unnormalised.
"""

from __future__ import annotations

import math

import torch
from monai.networks.blocks import UnetOutBlock, UnetrBasicBlock, UnetrPrUpBlock, UnetrUpBlock
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from medmae.models.mae3d import ViTEncoder3D


def tap_blocks(depth: int, levels: int) -> list[int]:
    """0-based blocks feeding the skips at grid x 2**j, j = 1 .. levels-1 (deeper block -> coarser level).

    For 12 blocks and patch 16 these are UNETR's own: blocks 9, 6, 3.
    """
    return [min(depth - 1, round(depth * (levels - j) / levels)) for j in range(1, levels)]


class LightSegmenter(nn.Module):
    """ViT encoder (timm 2D or medmae 3D) + UNETR-style decoder generalised to ``patch = 2**L`` and any depth."""

    def __init__(
        self,
        encoder: VisionTransformer | ViTEncoder3D,
        num_classes: int,
        feature_size: int = 16,
        norm_name: str | tuple = "instance",
        tap_norm: bool = True,
    ) -> None:
        super().__init__()
        volumetric = isinstance(encoder, ViTEncoder3D)
        dims = 3 if volumetric else 2
        patch = int(encoder.patch_size if volumetric else encoder.patch_embed.patch_size[0])
        levels = int(round(math.log2(patch)))
        if 2**levels != patch or levels < 1:
            raise ValueError(f"the light decoder needs a power-of-two patch size, got encoder.patch_size {patch}")
        self.encoder = encoder
        self.grid = tuple(int(g) for g in (encoder.grid if volumetric else encoder.patch_embed.grid_size))
        self.taps = tap_blocks(len(encoder.blocks), levels)
        dim, in_chans = int(encoder.embed_dim), int(encoder.patch_embed.proj.in_channels)
        self.tap_norms = nn.ModuleList(nn.LayerNorm(dim, eps=1e-6) if tap_norm else nn.Identity() for _ in self.taps)
        width = [feature_size * 2**j for j in range(levels)]  # channels at full res / 2**j
        self.stem = UnetrBasicBlock(
            dims, in_chans, width[0], kernel_size=3, stride=1, norm_name=norm_name, res_block=True
        )
        # skip at resolution grid * 2**j lives at full-res / 2**(levels - j): width index levels - j
        self.skips = nn.ModuleList(
            UnetrPrUpBlock(
                dims,
                dim,
                width[levels - j],
                num_layer=j - 1,
                kernel_size=3,
                stride=1,
                upsample_kernel_size=2,
                norm_name=norm_name,
                conv_block=True,
                res_block=True,
            )
            for j in range(1, levels)
        )
        ups = []
        in_ch = dim
        for j in range(1, levels + 1):  # to grid * 2**j
            out_ch = width[levels - j]
            ups.append(
                UnetrUpBlock(
                    dims, in_ch, out_ch, kernel_size=3, upsample_kernel_size=2, norm_name=norm_name, res_block=True
                )
            )
            in_ch = out_ch
        self.ups = nn.ModuleList(ups)
        self.head = UnetOutBlock(dims, width[0], num_classes)

    def _fmap(self, tokens: torch.Tensor) -> torch.Tensor:
        patches = tokens[:, self.encoder.num_prefix_tokens :]
        return patches.transpose(1, 2).reshape(tokens.shape[0], -1, *self.grid)

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Patch tokens with positions (and the class token) as the encoder's blocks take them."""
        enc = self.encoder
        if isinstance(enc, ViTEncoder3D):
            return enc.prepend_cls(enc.embed(x))
        return enc.norm_pre(enc.patch_drop(enc._pos_embed(enc.patch_embed(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        enc = self.encoder
        tokens = self._tokens(x)
        hidden = []
        for block in enc.blocks:
            tokens = block(tokens)
            hidden.append(tokens)
        y = self._fmap(enc.norm(tokens))
        skips = [
            skip(self._fmap(norm(hidden[b])))
            for skip, norm, b in zip(self.skips, self.tap_norms, self.taps, strict=True)
        ]
        for j, up in enumerate(self.ups, start=1):  # j-th upsampling reaches grid * 2**j
            y = up(y, skips[j - 1] if j <= len(skips) else self.stem(x))
        return self.head(y)
