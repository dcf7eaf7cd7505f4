"""Warmup + half-cycle cosine for fine-tuning, honouring each group's ``lr_scale`` (layer decay).

``encoder_hold`` steps of decoder-first training (LP-FT, Kumar et al. 2022): the encoder's groups (those
``layer_decay_groups`` marks ``encoder``) stay at lr 0 while the freshly initialised decoder or head
learns on the encoder's features as they are; then the encoder gets its own warmup and cosine over
the remaining steps. A random head's early gradients no longer overwrite pretrained features.
"""

from __future__ import annotations

from functools import partial

import torch
from torch.optim.lr_scheduler import LambdaLR

from medmae.train.schedule import lr_at_step


def _factor(step: int, base_lr: float, min_lr: float, warmup: int, total: int, scale: float, hold: int = 0) -> float:
    if step < hold:
        return 0.0
    return scale * lr_at_step(step - hold, base_lr, min_lr, warmup, total - hold) / base_lr


def warmup_cosine(
    optimizer: torch.optim.Optimizer, base_lr: float, min_lr: float, warmup: int, total: int, encoder_hold: int = 0
) -> LambdaLR:
    """Per-step schedule; group ``g`` runs at ``g["lr_scale"] * lr(step)`` (AdamW's lr must be ``base_lr``).

    Groups marked ``encoder`` start ``encoder_hold`` steps late (lr 0 until then), with the same warmup.
    """
    total = max(1, total)
    if not 0 <= encoder_hold < total:
        raise ValueError(f"model.encoder_hold_steps must be in [0, {total}) (the run's steps), got {encoder_hold!r}")
    rules = []
    for g in optimizer.param_groups:
        hold = encoder_hold if g.get("encoder", False) else 0
        rules.append(
            partial(
                _factor,
                base_lr=base_lr,
                min_lr=min(min_lr, base_lr),
                warmup=min(warmup, total - hold),
                total=total,
                scale=float(g.get("lr_scale", 1.0)),
                hold=hold,
            )
        )
    return LambdaLR(optimizer, rules)


def adamw_warmup_cosine(
    groups: list[dict], lr: float, min_lr: float, warmup: int, total: int, encoder_hold: int = 0
) -> dict:
    """Lightning's ``configure_optimizers`` answer for layer-decay groups: AdamW + per-step warmup-cosine."""
    for g in groups:
        g.pop("names", None)
    opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999))
    schedule = warmup_cosine(opt, lr, min_lr, warmup, total, encoder_hold)
    return {"optimizer": opt, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
