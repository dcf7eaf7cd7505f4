"""Fixed 2D sine-cosine position embeddings for (possibly non-square) patch grids."""

from __future__ import annotations

import torch


def _sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    out = positions.reshape(-1, 1).double() * omega.reshape(1, -1)
    return torch.cat([out.sin(), out.cos()], dim=1)


def sincos_pos_embed_2d(embed_dim: int, grid: tuple[int, int], cls_token: bool = False) -> torch.Tensor:
    """(1, [1 +] h*w, D) embeddings: half the channels encode the column, half the row.

    Tokens are in row-major grid order (as ViT patch embedding flattens them); the cls slot is zeros.
    """
    if embed_dim % 4:
        raise ValueError(f"embed_dim must be divisible by 4 for 2D sin-cos embeddings, got {embed_dim}")
    gh, gw = grid
    rows = torch.arange(gh).repeat_interleave(gw)
    cols = torch.arange(gw).repeat(gh)
    emb = torch.cat([_sincos_1d(embed_dim // 2, cols), _sincos_1d(embed_dim // 2, rows)], dim=1)
    if cls_token:
        emb = torch.cat([torch.zeros(1, embed_dim, dtype=emb.dtype), emb], dim=0)
    return emb.float().unsqueeze(0)
