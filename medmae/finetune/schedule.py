"""Warmup + half-cycle cosine for fine-tuning, honouring each group's ``lr_scale`` (layer decay)."""

from __future__ import annotations

from functools import partial

import torch
from torch.optim.lr_scheduler import LambdaLR

from medmae.train.schedule import lr_at_step


def _factor(step: int, base_lr: float, min_lr: float, warmup: int, total: int, scale: float) -> float:
    return scale * lr_at_step(step, base_lr, min_lr, warmup, total) / base_lr


def warmup_cosine(optimizer: torch.optim.Optimizer, base_lr: float, min_lr: float, warmup: int, total: int) -> LambdaLR:
    """Per-step schedule; group ``g`` runs at ``g["lr_scale"] * lr(step)`` (AdamW's lr must be ``base_lr``)."""
    rules = [
        partial(
            _factor,
            base_lr=base_lr,
            min_lr=min(min_lr, base_lr),
            warmup=min(warmup, total),
            total=max(1, total),
            scale=float(g.get("lr_scale", 1.0)),
        )
        for g in optimizer.param_groups
    ]
    return LambdaLR(optimizer, rules)


def adamw_warmup_cosine(groups: list[dict], lr: float, min_lr: float, warmup: int, total: int) -> dict:
    """Lightning's ``configure_optimizers`` answer for layer-decay groups: AdamW + per-step warmup-cosine."""
    for g in groups:
        g.pop("names", None)
    opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999))
    schedule = warmup_cosine(opt, lr, min_lr, warmup, total)
    return {"optimizer": opt, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
