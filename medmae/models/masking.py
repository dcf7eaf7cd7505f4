"""Per-sample random masking by argsort of noise (He et al. 2021), with an explicit generator.

The generator is passed in rather than drawn from the global RNG so that training can give every
DDP rank its own mask stream and save it in checkpoints for exact resume.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class Masking(NamedTuple):
    """Result of :func:`random_masking`.

    Attributes:
        visible: (B, K, D) the kept tokens, in their original (spatial) order.
        mask: (B, N) float, 1 for masked (removed) tokens, 0 for visible ones.
        ids_restore: (B, N) order that puts ``cat([visible, masked])`` back in the original order.
        ids_keep: (B, K) indices of the visible tokens, ascending.
    """

    visible: torch.Tensor
    mask: torch.Tensor
    ids_restore: torch.Tensor
    ids_keep: torch.Tensor


def visible_count(num_tokens: int, mask_ratio: float) -> int:
    """Exactly ``round(N * (1 - mask_ratio))`` tokens stay visible; at least one must."""
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    keep = int(round(num_tokens * (1.0 - mask_ratio)))
    if keep < 1:
        raise ValueError(f"mask_ratio {mask_ratio} leaves no visible token out of {num_tokens}")
    return keep


def random_masking(
    tokens: torch.Tensor, mask_ratio: float, generator: torch.Generator | None = None
) -> Masking:
    """Keep a random subset of ``visible_count(N, mask_ratio)`` tokens per sample.

    Visible tokens are kept in ascending position order, so with ``mask_ratio=0`` the output equals
    the input exactly (and an encoder run on it equals the plain ViT).
    """
    b, n, d = tokens.shape
    keep = visible_count(n, mask_ratio)
    noise = torch.rand(b, n, device=tokens.device, generator=generator)
    ids_shuffle = noise.argsort(dim=1)
    ids_keep = ids_shuffle[:, :keep].sort(dim=1).values
    ids_restore = torch.cat([ids_keep, ids_shuffle[:, keep:]], dim=1).argsort(dim=1)
    visible = tokens.gather(1, ids_keep.unsqueeze(-1).expand(-1, -1, d))
    mask = torch.ones(b, n, device=tokens.device, dtype=tokens.dtype)
    mask.scatter_(1, ids_keep, 0.0)
    return Masking(visible, mask, ids_restore, ids_keep)
