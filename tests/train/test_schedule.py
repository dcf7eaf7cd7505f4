import math

import pytest

from medmae.train import lr_at_step, scaled_lr


def test_scaled_lr_follows_linear_rule() -> None:
    assert scaled_lr(1.5e-4, 4096) == pytest.approx(2.4e-3)
    with pytest.raises(ValueError):
        scaled_lr(1e-4, 0)


def test_warmup_is_linear_then_half_cosine_to_min() -> None:
    lrs = [lr_at_step(s, 1.0, 0.1, warmup_steps=10, total_steps=110) for s in range(120)]
    assert lrs[0] == pytest.approx(0.1) and lrs[4] == pytest.approx(0.5) and lrs[9] == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(1.0)
    assert lrs[60] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lrs[110] == pytest.approx(0.1) and lrs[119] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))


def test_no_warmup() -> None:
    assert lr_at_step(0, 2.0, 0.0, warmup_steps=0, total_steps=10) == pytest.approx(2.0)
