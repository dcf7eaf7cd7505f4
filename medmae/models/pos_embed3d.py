"""Fixed 3D sine-cosine position embeddings for (possibly non-cubic) patch grids.

Layout, for a volume ``(B, C, S0, S1, S2)`` whose patch grid is ``(g0, g1, g2)``: tokens are in
row-major grid order (token ``(i0 * g1 + i1) * g2 + i2``, as ``Conv3d(...).flatten(2)`` yields them) and
the channels are three equal blocks ``[sincos(i1), sincos(i0), sincos(i2)]``, each ``[sin | cos]`` of
``D / 6`` frequencies ``1 / 10000**(k / (D / 6))``. This is exactly MONAI's
``build_sincos_position_embedding(grid, D, spatial_dims=3)`` (and SelfMedMAE's), so a MONAI ViT built
with ``pos_embed_type="sincos"`` for another input size uses the same position function as pretraining.
"""

from __future__ import annotations

import torch


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """(len(positions), dim) float64 ``[sin | cos]`` of ``dim / 2`` geometric frequencies."""
    if dim % 2:
        raise ValueError(f"dim must be even for a 1D sin-cos embedding, got {dim}")
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    out = positions.reshape(-1, 1).double() * omega.reshape(1, -1)
    return torch.cat([out.sin(), out.cos()], dim=1)


def sincos_pos_embed_3d(embed_dim: int, grid: tuple[int, int, int], cls_token: bool = False) -> torch.Tensor:
    """(1, [1 +] g0*g1*g2, D) fixed embeddings in the module's layout; the cls slot (first) is zeros."""
    if embed_dim < 6 or embed_dim % 6:
        raise ValueError(f"embed_dim must be a positive multiple of 6 for 3D sin-cos embeddings, got {embed_dim}")
    if len(grid) != 3 or any(int(g) < 1 for g in grid):
        raise ValueError(f"grid must be three positive sizes (g0, g1, g2), got {grid!r}")
    i0, i1, i2 = torch.meshgrid(*(torch.arange(int(g)) for g in grid), indexing="ij")
    third = embed_dim // 3
    emb = torch.cat([sincos_1d(third, i1), sincos_1d(third, i0), sincos_1d(third, i2)], dim=1)
    if cls_token:
        emb = torch.cat([torch.zeros(1, embed_dim, dtype=emb.dtype), emb], dim=0)
    return emb.float().unsqueeze(0)
