"""IntensityRule: the one intensity rule of slices, volumes, fine-tuning and inference."""

from __future__ import annotations

import numpy as np
import pytest

from medmae.data.intensity import IntensityRule
from tests.data.conftest import make_record

WINDOWS = [(40.0, 400.0), (-600.0, 1500.0), (400.0, 1800.0)]


def test_pretraining_draws_a_window_and_inference_fixes_it() -> None:
    rule = IntensityRule.checked(ct_windows=WINDOWS, ct_inference_window=2)
    ct = make_record("ct", np.zeros((2, 4, 4), np.int16))
    drawn = {tuple(rule.ranges(ct, np.random.default_rng(s))[0]) for s in range(40)}
    assert drawn == {(-160.0, 240.0), (-1350.0, 150.0), (-500.0, 1300.0)}
    assert rule.inference_ranges("HU", ct.stats) == [(-500.0, 1300.0)]


def test_channels_mode_gives_every_window_and_percentiles_repeat() -> None:
    rule = IntensityRule.checked(ct_windows=WINDOWS, ct_window_mode="channels", percentiles=(1.0, 99.0))
    mr = make_record("mr", np.arange(100, dtype=np.int16).reshape(1, 10, 10), modality="MR")
    assert rule.inference_ranges("HU", {}) == [(-160.0, 240.0), (-1350.0, 150.0), (-500.0, 1300.0)]
    lo, hi = mr.stats["p1"], mr.stats["p99"]
    assert rule.inference_ranges("raw", mr.stats) == [(lo, hi)] * 3
    assert rule.ranges(mr, np.random.default_rng(0)) == [(lo, hi)] * 3
    assert rule.groups == 3


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"ct_windows": [(40, 0)]}, "ct_windows"),
        ({"ct_window_mode": "mean"}, "ct_window_mode"),
        ({"ct_inference_window": 3}, "ct_inference_window"),
        ({"percentiles": (99.5, 0.5)}, "percentiles"),
        ({"foreground_fraction": 1.0}, "foreground_fraction"),
    ],
)
def test_bad_values_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        IntensityRule.checked(**{"ct_windows": WINDOWS, **kwargs})
