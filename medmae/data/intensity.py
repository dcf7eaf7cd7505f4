"""The intensity rule shared by 2D/2.5D slices and 3D volumes: CT windows in HU, percentiles otherwise.

One place decides how stored values become [0, 1] and what counts as foreground, so a slice sample
(``SliceTransform``) and a volume sample (``VolumeTransform``) can never disagree, and the card
records the same ``intensity`` and ``foreground`` sections for both.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from medmae.data.cache import PERCENTILES, SeriesRecord

CT_WINDOW_MODES = ("random", "channels")
#: (level, width) in HU: soft tissue, lung, bone.
DEFAULT_CT_WINDOWS: tuple[tuple[float, float], ...] = ((40.0, 400.0), (-600.0, 1500.0), (400.0, 1800.0))

#: How the stored percentiles that scale non-HU series are computed (the card states it in full, so
#: someone without medmae can reproduce the input). Checked against data_prep/decode.py and
#: medmae.data.cache.compute_stats.
PERCENTILE_RULE: dict[str, str] = {
    "voxels": (
        "every stored voxel of the whole series (all slices; background, air and any padding outside "
        "the field of view included: DICOM Pixel Padding Value is not masked), not the crop, the plane "
        "or a foreground mask; computed once by `medmae prep`"
    ),
    "values": (
        "stored values = modality LUT output: DICOM RescaleSlope/RescaleIntercept or the Modality LUT "
        "Sequence, NIfTI scl_slope/scl_inter; MONOCHROME1 inverted as lo + hi - v, [lo, hi] being the "
        "output range of every value the header allows (higher = brighter); no VOI LUT, window or "
        "other display transform applied; NIfTI 4D: the first volume"
    ),
    "method": "numpy.percentile, linear interpolation between order statistics (method='linear')",
    "degenerate": "when p_high <= p_low the range is [p_low, p_low + 1] (a constant series maps to 0)",
    "reference": (
        "medmae compute_stats, stored per series at prep time; fine-tuning recomputes it the same way for NIfTI"
    ),
}


def window_range(level: float, width: float) -> tuple[float, float]:
    """HU range ``(low, high)`` shown by a window of ``level`` (centre) and ``width``."""
    return level - width / 2.0, level + width / 2.0


def number(value: object, field: str) -> float:
    """``value`` as a float; ValueError naming ``field`` unless it is a finite real number."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{field} must be a finite number, got {value!r}")
    return float(value)


def pair(value: object, field: str) -> tuple[float, float]:
    """``value`` as two floats; ValueError naming ``field`` otherwise."""
    try:
        a, b = (float(v) for v in value)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise ValueError(f"{field} must be a pair of numbers, got {value!r}") from None
    return a, b


@dataclass(frozen=True)
class IntensityRule:
    """Stored values -> [0, 1], and the foreground threshold, per series.

    Args:
        ct_windows: CT windows as ``(level, width)`` pairs in HU.
        ct_window_mode: ``"random"`` (one window per sample, uniformly; a single window is a fixed
            window) or ``"channels"`` (every window, stacked as channels).
        ct_inference_window: index into ``ct_windows`` of the window fine-tuning and inference use
            in ``"random"`` mode; recorded only, pretraining still draws.
        percentiles: ``(low, high)`` stored percentiles (from ``cache.PERCENTILES``) mapped to 0 and 1
            for every series that is not in HU.
        foreground_fraction: minimum fraction of foreground pixels/voxels in a crop; 0 disables.
        foreground_hu: CT foreground threshold in HU (air is -1000, fat about -100).
        foreground_level: non-CT foreground threshold, as a fraction of the series' percentile range.
    """

    ct_windows: tuple[tuple[float, float], ...] = DEFAULT_CT_WINDOWS
    ct_window_mode: str = "random"
    ct_inference_window: int = 0
    percentiles: tuple[float, float] = (0.5, 99.5)
    foreground_fraction: float = 0.0
    foreground_hu: float = -500.0
    foreground_level: float = 0.1

    @classmethod
    def checked(
        cls,
        ct_windows: Sequence[tuple[float, float]] = DEFAULT_CT_WINDOWS,
        ct_window_mode: str = "random",
        ct_inference_window: int = 0,
        percentiles: tuple[float, float] = (0.5, 99.5),
        foreground_fraction: float = 0.0,
        foreground_hu: float = -500.0,
        foreground_level: float = 0.1,
    ) -> IntensityRule:
        """Validate and normalise every field; ValueError naming the field."""
        windows = tuple(pair(w, "ct_windows entry") for w in ct_windows)
        if not windows or any(not (math.isfinite(lv) and math.isfinite(wd) and wd > 0) for lv, wd in windows):
            raise ValueError(
                f"ct_windows must be a non-empty list of (level, width) pairs with width > 0, got {ct_windows!r}"
            )
        if ct_window_mode not in CT_WINDOW_MODES:
            raise ValueError(f"ct_window_mode must be one of {CT_WINDOW_MODES}, got {ct_window_mode!r}")
        if (
            isinstance(ct_inference_window, bool)
            or not isinstance(ct_inference_window, int)
            or not 0 <= ct_inference_window < len(windows)
        ):
            raise ValueError(
                f"ct_inference_window must index ct_windows (0..{len(windows) - 1}), got {ct_inference_window!r}"
            )
        p_lo, p_hi = pair(percentiles, "percentiles")
        if p_lo not in PERCENTILES or p_hi not in PERCENTILES or not p_lo < p_hi:
            raise ValueError(
                f"percentiles must be two increasing values from the cache's stored {PERCENTILES}, got {percentiles!r}"
            )
        if not 0.0 <= number(foreground_fraction, "foreground_fraction") < 1.0:
            raise ValueError(f"foreground_fraction must be in [0, 1), got {foreground_fraction!r}")
        number(foreground_hu, "foreground_hu")
        if not 0.0 <= number(foreground_level, "foreground_level") < 1.0:
            raise ValueError(f"foreground_level must be in [0, 1), got {foreground_level!r}")
        return cls(
            windows,
            ct_window_mode,
            ct_inference_window,
            (p_lo, p_hi),
            float(foreground_fraction),
            float(foreground_hu),
            float(foreground_level),
        )

    @property
    def ct_ranges(self) -> tuple[tuple[float, float], ...]:
        return tuple(window_range(lv, wd) for lv, wd in self.ct_windows)

    @property
    def groups(self) -> int:
        """Channel groups per sample: the number of windows in ``"channels"`` mode, else 1."""
        return len(self.ct_windows) if self.ct_window_mode == "channels" else 1

    def ranges(self, record: SeriesRecord, rng: np.random.Generator) -> list[tuple[float, float]]:
        """The ``(low, high)`` ranges mapped to [0, 1] in pretraining, one per output channel group.

        Series in HU (CT) get their window(s); all others the stored percentiles, repeated to the
        number of windows in ``"channels"`` mode so every sample has the same channel count. In
        ``"random"`` mode one draw from ``rng`` picks the CT window (also drawn, and ignored, for
        non-CT series, so the RNG stream does not depend on modality).
        """
        pick = int(rng.integers(len(self.ct_windows))) if self.ct_window_mode == "random" else None
        return self._ranges(record.intensity, record.stats, pick)

    def inference_ranges(self, intensity: str, stats: Mapping[str, float]) -> list[tuple[float, float]]:
        """The same rule with its one random choice fixed, for fine-tuning and inference: window
        ``ct_inference_window`` in ``"random"`` mode, every window in ``"channels"`` mode."""
        pick = self.ct_inference_window if self.ct_window_mode == "random" else None
        return self._ranges(intensity, stats, pick)

    def _ranges(self, intensity: str, stats: Mapping[str, float], pick: int | None) -> list[tuple[float, float]]:
        ct_ranges = self.ct_ranges
        if intensity == "HU":
            return list(ct_ranges) if pick is None else [ct_ranges[pick]]
        lo = float(stats[f"p{self.percentiles[0]:g}"])
        hi = float(stats[f"p{self.percentiles[1]:g}"])
        if not hi > lo:  # constant image: everything maps to 0
            hi = lo + 1.0
        return [(lo, hi)] * (len(ct_ranges) if pick is None else 1)

    def foreground_threshold(self, record: SeriesRecord) -> float:
        """Stored value above which a pixel counts as foreground (``foreground_hu`` for HU series)."""
        if record.intensity == "HU":
            return self.foreground_hu
        lo = record.stats[f"p{self.percentiles[0]:g}"]
        hi = record.stats[f"p{self.percentiles[1]:g}"]
        return lo + self.foreground_level * (hi - lo)

    def describe(self, evaluated_on: str) -> dict[str, object]:
        """The card's ``intensity`` and ``foreground`` sections."""
        return {
            "intensity": {
                "ct": {
                    "applies_to": "series with intensity unit HU",
                    "windows_level_width": [list(w) for w in self.ct_windows],
                    "mode": self.ct_window_mode,
                    "inference_window": self.ct_inference_window,
                    "inference": (
                        "every window as channels"
                        if self.ct_window_mode == "channels"
                        else "fine-tuning and inference use windows_level_width[inference_window]"
                    ),
                    "values": (
                        "stored HU = modality LUT output (DICOM RescaleSlope/Intercept; NIfTI scl_slope/scl_inter), "
                        "no VOI LUT; windows apply after the resize"
                    ),
                },
                "other": {
                    "method": "stored percentiles -> [0, 1]",
                    "percentiles": list(self.percentiles),
                    "percentile_rule": PERCENTILE_RULE,
                },
                "output_range": [0.0, 1.0],
                "dtype": "float32",
            },
            "foreground": {
                "enabled": self.foreground_fraction > 0.0,
                "min_fraction": self.foreground_fraction,
                "ct_threshold_hu": self.foreground_hu,
                "other_threshold_fraction_of_percentile_range": self.foreground_level,
                "evaluated_on": evaluated_on,
            },
        }
