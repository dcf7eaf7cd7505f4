"""What every MAE shares, whatever its dimension: decoder pass, target, loss, outputs, compilation.

:class:`MAEBase` holds the steps of He et al. that do not depend on whether patches are squares or
cubes; :class:`~medmae.models.mae.MaskedAutoencoder` (2D, timm encoder) and
:class:`~medmae.models.mae3d.MaskedAutoencoder3D` supply ``patchify`` / ``unpatchify``,
``forward_encoder`` and the modules the decoder pass uses (``encoder`` with ``blocks`` and
``num_prefix_tokens``, ``decoder_embed``, ``mask_token``, ``decoder_pos_embed``, ``decoder_blocks``,
``decoder_norm``, ``decoder_pred``) and the attributes ``mask_ratio`` and ``norm_pix_loss``; a 2D MAE
with ``hog_weight > 0`` also has ``hog`` (:class:`~medmae.models.hog.HOGTarget`) and ``decoder_pred_hog``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import nn


class MAEOutput(NamedTuple):
    """What a forward pass returns.

    Attributes:
        loss: scalar, mean squared error over masked patches (in fp32); with ``hog_weight > 0`` plus
            ``hog_weight`` x the same error of the HOG head against the patches' HOG.
        pred: (B, N, P) predicted patches, P = patch pixels x channels (normalised per patch when
            ``norm_pix_loss``).
        mask: (B, N) 1 for masked patches, 0 for visible.
    """

    loss: torch.Tensor
    pred: torch.Tensor
    mask: torch.Tensor


class MAEBase(nn.Module):
    """Decoder pass, norm-pix target, masked MSE, forward, pixels for logging, in-place compilation."""

    mask_ratio: float
    norm_pix_loss: bool
    #: weight of the HOG target beside the pixels (0: pixels only; 2D only, see medmae.models.hog)
    hog_weight: float = 0.0

    def _init_linear_and_norms(self) -> None:
        """Official MAE init of every Linear (xavier uniform, zero bias) and LayerNorm (1, 0)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def unpatchify(self, patches: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward_encoder(
        self, x: torch.Tensor, mask_ratio: float, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(latent (B, prefix + K, D), mask (B, N), ids_restore (B, N))``."""
        raise NotImplementedError

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """Predicted patches (B, N, P) from the decoder's features (:meth:`decoder_features`)."""
        return self.decoder_pred(self.decoder_features(latent, ids_restore))

    def decoder_features(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """Fill masked positions with the shared mask token, restore order, decode: (B, N, D_dec), no prefix."""
        prefix = int(self.encoder.num_prefix_tokens)
        x = self.decoder_embed(latent)
        b, n = ids_restore.shape
        mask_tokens = self.mask_token.to(x.dtype).expand(b, n + prefix - x.shape[1], -1)
        patches = torch.cat([x[:, prefix:, :], mask_tokens], dim=1)
        patches = patches.gather(1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2]))
        x = torch.cat([x[:, :prefix, :], patches], dim=1) + self.decoder_pos_embed.to(x.dtype)
        x = self.decoder_blocks(x)
        return self.decoder_norm(x)[:, prefix:, :]

    def target_patches(self, x: torch.Tensor) -> torch.Tensor:
        """The regression target: patches, normalised per patch when ``norm_pix_loss`` (fp32)."""
        target = self.patchify(x.float())
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6).sqrt()
        return target

    def forward_loss(self, x: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean squared error over masked patches only, in fp32 (0 when nothing is masked)."""
        return _masked_mse(pred, self.target_patches(x), mask)

    def hog_loss(self, x: torch.Tensor, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The HOG head's mean squared error over masked patches against the patches' HOG (fp32)."""
        return _masked_mse(self.decoder_pred_hog(features), self.hog(x), mask)

    def forward(
        self, x: torch.Tensor, mask_ratio: float | None = None, generator: torch.Generator | None = None
    ) -> MAEOutput:
        ratio = self.mask_ratio if mask_ratio is None else mask_ratio
        latent, mask, ids_restore = self.forward_encoder(x, ratio, generator)
        features = self.decoder_features(latent, ids_restore)
        pred = self.decoder_pred(features)
        loss = self.forward_loss(x, pred, mask)
        if self.hog_weight:
            loss = loss + self.hog_weight * self.hog_loss(x, features, mask)
        return MAEOutput(loss, pred, mask)

    def pixels_from_prediction(self, x: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
        """Predicted patches back to image/volume space, undoing norm-pix with the true patch mean/std."""
        pred = pred.float()
        if self.norm_pix_loss:
            target = self.patchify(x.float())
            mean = target.mean(dim=-1, keepdim=True)
            std = (target.var(dim=-1, keepdim=True) + 1.0e-6).sqrt()
            pred = pred * std + mean
        return self.unpatchify(pred)

    def compile_blocks(self, **options: Any) -> None:
        """``torch.compile`` the encoder blocks, the whole decoder and the loss in place.

        State-dict keys stay unchanged (modules compile in place; the decoder and loss methods are
        shadowed by compiled versions on this instance: compile after pickling, e.g. in ``setup``).
        Shapes stay static because every sample keeps the same number of visible tokens; only the
        masking (its generator is not traceable) and the patch embedding stay eager.
        """
        options.setdefault("dynamic", False)
        self.encoder.blocks.compile(**options)
        self.decoder_features = torch.compile(self.decoder_features, **options)  # type: ignore[method-assign]
        self.decoder_pred.compile(**options)
        self.forward_loss = torch.compile(self.forward_loss, **options)  # type: ignore[method-assign]
        if self.hog_weight:
            self.hog_loss = torch.compile(self.hog_loss, **options)  # type: ignore[method-assign]


def _masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    per_patch = (pred.float() - target).pow(2).mean(dim=-1)
    mask = mask.to(per_patch.dtype)
    return (per_patch * mask).sum() / mask.sum().clamp_min(1.0)
