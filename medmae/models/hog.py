"""Histograms of oriented gradients per patch: the masked-feature target of MaskFeat (Wei et al. 2022).

A pixel target with norm-pix asks the encoder for each masked patch's normalised texture; a HOG target
asks for the *shape* of its edges (which way intensity changes, and how strongly relative to the rest of
the patch), invariant to the patch's brightness and contrast. MaskFeat found it a better target than
pixels at the same budget; medmae offers it *beside* the pixels (``model.mae.hog_weight``), as an extra
head on the same decoder, so the reconstruction images and the pixel loss stay what they were.

The descriptor follows MaskFeat: per input channel, central-difference gradients (``[-1, 0, 1]``, edges
reflected), unsigned orientation in ``bins`` bins over [0, pi) with linear vote splitting between the two
nearest bins, magnitudes averaged over ``cell`` x ``cell`` pixel cells, and the cells of one patch
L2-normalised together. It is scaled by ``sqrt(dim)`` so its mean square per element is 1, like a
norm-pix target's, which keeps ``hog_weight`` a plain ratio between the two losses. Computed on the
device from the batch (no cache change, nothing stored), 2D only.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class HOGTarget(nn.Module):
    """``(B, C, H, W)`` images -> ``(B, N, dim)`` per-patch HOG, patches in ``patchify``'s row-major order."""

    def __init__(self, channels: int, patch_size: int, cell: int = 8, bins: int = 9) -> None:
        super().__init__()
        if patch_size % cell:
            raise ValueError(f"model.mae.hog_weight needs a patch size that is a multiple of {cell}, got {patch_size}")
        self.channels, self.patch_size, self.cell, self.bins = channels, patch_size, cell, bins
        self.cells_per_side = patch_size // cell
        kernel = torch.tensor([-1.0, 0.0, 1.0])
        self.register_buffer("dx", kernel.view(1, 1, 1, 3).repeat(channels, 1, 1, 1), persistent=False)
        self.register_buffer("dy", kernel.view(1, 1, 3, 1).repeat(channels, 1, 1, 1), persistent=False)

    @property
    def dim(self) -> int:
        """Length of one patch's descriptor: channels x bins x cells per patch."""
        return self.channels * self.bins * self.cells_per_side**2

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float()
        b, c, h, w = x.shape
        gx = F.conv2d(F.pad(x, (1, 1, 0, 0), mode="reflect"), self.dx, groups=c)
        gy = F.conv2d(F.pad(x, (0, 0, 1, 1), mode="reflect"), self.dy, groups=c)
        magnitude = torch.hypot(gx, gy)
        position = torch.remainder(torch.atan2(gy, gx), math.pi) / (math.pi / self.bins)  # in [0, bins]
        lower = torch.floor(position)
        upper_share = position - lower
        lower = lower.long() % self.bins
        upper = (lower + 1) % self.bins
        # one bin at a time, pooled at once: peak memory one (B, C, H, W) map, not bins of them
        cells = torch.stack(
            [
                F.avg_pool2d(magnitude * ((lower == k) * (1 - upper_share) + (upper == k) * upper_share), self.cell)
                for k in range(self.bins)
            ],
            dim=2,
        ).reshape(b, c * self.bins, h // self.cell, w // self.cell)  # channel-major, then bin
        k = self.cells_per_side
        gh, gw = cells.shape[2] // k, cells.shape[3] // k
        patches = cells.reshape(b, c * self.bins, gh, k, gw, k).permute(0, 2, 4, 1, 3, 5).reshape(b, gh * gw, -1)
        return F.normalize(patches, dim=-1, eps=1e-6) * math.sqrt(self.dim)
