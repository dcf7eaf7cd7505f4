"""Validation Dice has MONAI ``DiceMetric`` semantics: a class absent from the truth is left out, not 1."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from monai.metrics import DiceMetric, compute_dice
from monai.networks.utils import one_hot

from medmae.finetune.segment import dice_per_class, mean_dice

K = 4  # background + 3 foreground classes


def _volumes(seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """(prediction, truth) pairs covering every case: class in both, only in truth, only in prediction, in neither."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(6):
        truth = rng.integers(0, K, size=(5, 9, 7)).astype(np.uint8)
        pred = np.where(rng.random(truth.shape) < 0.6, truth, rng.integers(0, K, size=truth.shape)).astype(np.uint8)
        out.append((pred, truth))
    p, t = out[0]
    out[0] = (np.where(p == 3, 0, p).astype(np.uint8), np.where(t == 3, 0, t).astype(np.uint8))  # 3: in neither
    p, t = out[1]
    out[1] = (np.where(p == 2, 0, p).astype(np.uint8), t)  # 2: only in truth -> 0
    p, t = out[2]
    out[2] = (p, np.where(t == 1, 0, t).astype(np.uint8))  # 1: only in prediction -> NaN (MONAI) / 0
    return out


def _onehot(a: np.ndarray) -> torch.Tensor:
    return one_hot(torch.from_numpy(a.astype(np.int64))[None, None], num_classes=K)


@pytest.mark.parametrize("ignore_empty", [True, False])
def test_dice_per_class_equals_monai_compute_dice_on_one_hot_volumes(ignore_empty: bool) -> None:
    for pred, truth in _volumes():
        ours = dice_per_class(pred, truth, K, ignore_empty=ignore_empty)
        ref = compute_dice(_onehot(pred), _onehot(truth), include_background=False, ignore_empty=ignore_empty)[0]
        assert len(ours) == K - 1
        for a, b in zip(ours, ref.tolist(), strict=True):
            assert (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, abs=1e-6), (ours, ref)
    pred, truth = _volumes()[0]
    assert math.isnan(dice_per_class(pred, truth, K)[2])  # absent from both: NaN, no longer 1
    assert dice_per_class(pred, truth, K, ignore_empty=False)[2] == 1.0
    pred, truth = _volumes()[1]
    assert dice_per_class(pred, truth, K)[1] == 0.0  # in the truth, never predicted
    pred, truth = _volumes()[2]
    assert math.isnan(dice_per_class(pred, truth, K)[0]) and dice_per_class(pred, truth, K, ignore_empty=False)[0] == 0


def test_mean_dice_is_monai_mean_batch_then_the_mean_over_classes_with_truth() -> None:
    volumes = _volumes()
    rows = [dice_per_class(p, t, K) for p, t in volumes]
    metric = DiceMetric(include_background=False, reduction="mean_batch", ignore_empty=True)
    for p, t in volumes:
        metric(_onehot(p), _onehot(t))
    ref = metric.aggregate().tolist()
    per_class, mean = mean_dice(rows)
    assert per_class == pytest.approx(ref, abs=1e-6)
    assert mean == pytest.approx(float(np.mean(ref)), abs=1e-6)
    # the old rule (absent from both = 1) scored volume 0's class 3 as perfect
    old = np.mean([dice_per_class(p, t, K, ignore_empty=False) for p, t in volumes], axis=0)
    assert old[2] > per_class[2]


def test_a_class_no_volume_holds_is_left_out_and_no_class_at_all_gives_zero_not_nan() -> None:
    truth = np.zeros((2, 6, 6), np.uint8)
    truth[0, :3] = 1  # class 2 appears in no volume
    pred = truth.copy()
    pred[1, 0, 0] = 2  # a false positive of the absent class does not count either
    per_class, mean = mean_dice([dice_per_class(pred, truth, 3)])
    assert per_class[0] == 1.0 and math.isnan(per_class[1]) and mean == 1.0
    assert mean_dice([dice_per_class(pred, truth, 3, ignore_empty=False)])[1] == 0.5  # empty-inclusive variant
    empty = np.zeros((2, 6, 6), np.uint8)
    per_class, mean = mean_dice([dice_per_class(empty, empty, 3), dice_per_class(pred, empty, 3)])
    assert all(math.isnan(d) for d in per_class) and mean == 0.0


def test_dice_is_unchanged_where_the_truth_holds_every_class() -> None:
    """Where no class is absent from the truth, per-volume Dice is the old value bit for bit and the mean
    is the old mean up to float rounding (why docs/transfer.md's numbers stand)."""
    rng = np.random.default_rng(3)
    truth = rng.integers(0, K, size=(4, 10, 10)).astype(np.uint8)
    pred = rng.integers(0, K, size=truth.shape).astype(np.uint8)

    def old(p: np.ndarray, t: np.ndarray) -> list[float]:  # the rule before MONAI semantics
        out = []
        for k in range(1, K):
            a, b = p == k, t == k
            denom = int(a.sum()) + int(b.sum())
            out.append(1.0 if denom == 0 else 2.0 * int(np.logical_and(a, b).sum()) / denom)
        return out

    assert dice_per_class(pred, truth, K) == old(pred, truth)
    rows = [dice_per_class(pred, truth, K), dice_per_class(truth, truth, K)]
    assert mean_dice(rows)[1] == pytest.approx(float(np.mean(rows)), rel=1e-12)


def test_shapes_must_agree() -> None:
    with pytest.raises(ValueError, match="shape"):
        dice_per_class(np.zeros((2, 3, 3), np.uint8), np.zeros((2, 3, 4), np.uint8), 2)
