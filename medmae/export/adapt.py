"""Adapting exported encoder weights to a new input: image size (positions) and channel count.

Both rules are pure functions of a timm ViT ``state_dict`` and are applied *before* loading, so the
target model is a plain ``timm.create_model(...)`` of the new shape.

* **New image size**: the patch-position embeddings are resampled on their 2D grid with timm's own
  :func:`timm.layers.resample_abs_pos_embed` (bicubic, antialiased); the class-token slot is kept.
* **New channel count** (``k`` channels -> ``m`` channels), the *equal-channel rule*: every new
  channel's patch-embedding filter is the sum of the old filters divided by ``m``::

      W_new[:, j] = sum_i W_old[:, i] / m      for j = 1..m

  so an image whose channels are all equal embeds exactly as before. 1 -> k spreads a grayscale
  filter over k adjacent slices (a 2.5D stack of identical slices gives the 2D embedding); k -> 1
  folds a 2.5D encoder back onto one slice. (timm's ``adapt_input_conv`` only converts from 3 RGB
  channels; this rule is its generalisation to any count.)
"""

from __future__ import annotations

import torch
from timm.layers import resample_abs_pos_embed


def adapt_patch_embed_channels(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """Patch-embedding weight ``(D, k, p, p)`` -> ``(D, in_chans, p, p)`` by the equal-channel rule."""
    if weight.ndim != 4:
        raise ValueError(f"patch embedding weight must be (D, C, p, p), got shape {tuple(weight.shape)}")
    if in_chans < 1:
        raise ValueError(f"in_chans must be >= 1, got {in_chans}")
    if weight.shape[1] == in_chans:
        return weight
    folded = weight.sum(dim=1, keepdim=True) / in_chans
    return folded.expand(-1, in_chans, -1, -1).contiguous()


def resample_pos_embed(pos_embed: torch.Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int]) -> torch.Tensor:
    """``(1, 1 + h*w, D)`` positions on ``old_grid`` -> ``(1, 1 + H*W, D)`` on ``new_grid`` (class slot kept)."""
    if tuple(old_grid) == tuple(new_grid):
        return pos_embed
    expected = 1 + old_grid[0] * old_grid[1]
    if pos_embed.ndim != 3 or pos_embed.shape[1] != expected:
        raise ValueError(f"pos_embed of shape {tuple(pos_embed.shape)} does not fit a {old_grid} grid + class token")
    return resample_abs_pos_embed(pos_embed, list(new_grid), list(old_grid), num_prefix_tokens=1)


def adapt_state_dict(
    state: dict[str, torch.Tensor],
    *,
    old_grid: tuple[int, int],
    new_grid: tuple[int, int],
    in_chans: int,
) -> dict[str, torch.Tensor]:
    """A copy of a timm ViT ``state_dict`` fitted to a new patch grid and channel count."""
    out = dict(state)
    out["pos_embed"] = resample_pos_embed(state["pos_embed"], old_grid, new_grid)
    out["patch_embed.proj.weight"] = adapt_patch_embed_channels(state["patch_embed.proj.weight"], in_chans)
    return out
