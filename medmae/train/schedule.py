"""Learning-rate rules of the MAE recipe: batch-scaled base lr, per-step warmup, half-cycle cosine."""

from __future__ import annotations

import math


def scaled_lr(blr: float, effective_batch: int) -> float:
    """``lr = blr * effective_batch / 256`` (Goyal et al. linear scaling, as in the MAE paper)."""
    if effective_batch < 1:
        raise ValueError(f"effective batch must be >= 1, got {effective_batch}")
    return blr * effective_batch / 256.0


def lr_at_step(step: int, base_lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Linear warmup from 0 over ``warmup_steps``, then half-cycle cosine from ``base_lr`` to ``min_lr``.

    ``step`` counts optimizer steps from 0; past ``total_steps`` the rate stays at ``min_lr``.
    """
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
