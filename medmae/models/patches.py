"""Images <-> patch sequences, for any channel count and non-square images.

The patch vector layout is (p, p, C) row-major — the official MAE layout — so a decoder prediction
of width ``p*p*C`` maps back to pixels with :func:`unpatchify`.
"""

from __future__ import annotations

import torch


def grid_shape(img_size: tuple[int, int], patch_size: int) -> tuple[int, int]:
    """Patch grid (h, w) of an image; raises ValueError if a side is not a multiple of the patch."""
    height, width = img_size
    if patch_size <= 0:
        raise ValueError(f"patch_size must be positive, got {patch_size}")
    if height % patch_size or width % patch_size:
        raise ValueError(
            f"img_size {tuple(img_size)} is not divisible by patch_size {patch_size}: "
            f"both sides must be multiples of the patch size"
        )
    return height // patch_size, width // patch_size


def patchify(imgs: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, h*w, p*p*C), patches in row-major grid order."""
    if imgs.ndim != 4:
        raise ValueError(f"expected images of shape (B, C, H, W), got {tuple(imgs.shape)}")
    b, c, _, _ = imgs.shape
    gh, gw = grid_shape(imgs.shape[-2:], patch_size)
    p = patch_size
    x = imgs.reshape(b, c, gh, p, gw, p)
    x = x.permute(0, 2, 4, 3, 5, 1)  # b, gh, gw, p, p, c
    return x.reshape(b, gh * gw, p * p * c)


def unpatchify(patches: torch.Tensor, patch_size: int, grid: tuple[int, int], channels: int) -> torch.Tensor:
    """(B, h*w, p*p*C) -> (B, C, h*p, w*p); the inverse of :func:`patchify`."""
    b, n, d = patches.shape
    gh, gw = grid
    p = patch_size
    if n != gh * gw or d != p * p * channels:
        raise ValueError(
            f"patches of shape {tuple(patches.shape)} do not match grid {grid}, patch {p}, channels {channels}"
        )
    x = patches.reshape(b, gh, gw, p, p, channels)
    x = x.permute(0, 5, 1, 3, 2, 4)  # b, c, gh, p, gw, p
    return x.reshape(b, channels, gh * p, gw * p)
