"""The preprocessing values of a card or a fine-tuning record (2D planes, 3D volumes, intensity,
input normalisation), checked and bounded into a preprocessor's keyword arguments.

Split out of :mod:`medmae.export.card` (issue 19): the one validator of preprocessing values, whoever
reads them (:mod:`medmae.export.preprocessing`, :mod:`medmae.export.volume_preprocessing`, the
fine-tuning record); ``names`` says how each caller spells a field in its messages. Import the public
names from :mod:`medmae.export.card`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from medmae.export.card_types import LIMITS
from medmae.export.card_untrusted import _bad, _is_number, _short

#: where each preprocessing value sits in a card (fine-tuning records keep them flat: ``preprocessing.<name>``)
CARD_FIELDS = {
    "axis": "preprocessing.axis",
    "image_size": "preprocessing.image_size",
    "slice_offsets": "preprocessing.slice_offsets",
    "interpolation": "preprocessing.resize.interpolation",
    "antialias": "preprocessing.resize.antialias",
    "slice_spacing_mm": "preprocessing.slice_spacing_mm",
    "slice_interpolation": "preprocessing.slice_interpolation",
    "ct_windows": "preprocessing.intensity.ct.windows_level_width",
    "ct_window_mode": "preprocessing.intensity.ct.mode",
    "inference_window": "preprocessing.intensity.ct.inference_window",
    "percentiles": "preprocessing.intensity.other.percentiles",
    "size": "preprocessing.volume.size",
    "spacing_mm": "preprocessing.volume.spacing_mm",
}
RECORD_FIELDS = {name: f"preprocessing.{name}" for name in CARD_FIELDS}


def check_intensity_values(v: Mapping[str, Any], where: str, names: Mapping[str, str]) -> dict[str, Any]:
    """``ct_windows``, ``ct_window_mode``, ``inference_window``, ``percentiles`` (2D and 3D): checked, as the
    keyword arguments of a preprocessor. ``names`` says how the record spells each field."""
    from medmae.data.cache import PERCENTILES

    windows = v["ct_windows"]
    if (
        not isinstance(windows, list | tuple)
        or not 1 <= len(windows) <= LIMITS["in_chans"]
        or not all(isinstance(w, list | tuple) and len(w) == 2 and all(_is_number(x) for x in w) for w in windows)
    ):
        raise _bad(where, names["ct_windows"], f"is malformed: must be 1 to {LIMITS['in_chans']} finite "
                   f"[level, width] pairs, got {_short(windows)}")  # fmt: skip
    ct_windows = tuple((float(lv), float(wd)) for lv, wd in windows)
    if any(not wd > 0 for _, wd in ct_windows):
        raise _bad(where, names["ct_windows"], "needs windows of width > 0")
    mode = v["ct_window_mode"]
    if mode not in ("random", "channels"):
        raise _bad(where, names["ct_window_mode"], f"must be random or channels, got {_short(mode)}")
    inference_window = v["inference_window"]
    if (
        isinstance(inference_window, bool)
        or not isinstance(inference_window, int)
        or not (0 <= inference_window < len(ct_windows))
    ):
        raise _bad(where, names["inference_window"], f"is out of range: {_short(inference_window)}")
    pcts = v["percentiles"]
    if (
        not isinstance(pcts, list | tuple)
        or len(pcts) != 2
        or not all(_is_number(p) and p in PERCENTILES for p in pcts)
        or not pcts[0] < pcts[1]
    ):
        raise _bad(where, names["percentiles"], f"must be two of {PERCENTILES}, low before high, got {_short(pcts)}")
    return {
        "ct_windows": ct_windows,
        "ct_window_mode": mode,
        "inference_window": inference_window,
        "percentiles": (float(pcts[0]), float(pcts[1])),
    }


def check_plane_values(v: Mapping[str, Any], where: str, names: Mapping[str, str]) -> dict[str, Any]:
    """Every value of a 2D / 2.5D preprocessing (``PlanePreprocessor``'s fields), checked and bounded:
    its keyword arguments. Optional fields are given by the caller (their defaults when absent)."""
    from medmae.data.index import AXES
    from medmae.data.neighbours import SLICE_INTERPOLATIONS
    from medmae.data.transforms import INTERPOLATIONS

    axis = v["axis"]
    if not isinstance(axis, str) or axis not in AXES:
        raise _bad(where, names["axis"], f"must be one of {tuple(AXES)}, got {_short(axis)}")
    size, side = v["image_size"], LIMITS["img_size"]
    if (
        not isinstance(size, list | tuple)
        or len(size) != 2
        or not all(isinstance(s, int) and not isinstance(s, bool) and 1 <= s <= side for s in size)
    ):
        raise _bad(where, names["image_size"], f"must be [height, width], each 1 to {side}, got {_short(size)}")
    offsets = v["slice_offsets"]
    if (
        not isinstance(offsets, list | tuple)
        or not 1 <= len(offsets) <= LIMITS["in_chans"]
        or not all(isinstance(o, int) and not isinstance(o, bool) and abs(o) <= side for o in offsets)
    ):
        raise _bad(where, names["slice_offsets"], f"must be a list of 1 to {LIMITS['in_chans']} ints, "
                   f"got {_short(offsets)}")  # fmt: skip
    interp = v["interpolation"]
    if interp not in INTERPOLATIONS:
        raise _bad(where, names["interpolation"], f"must be one of {INTERPOLATIONS}, got {_short(interp)}")
    if not isinstance(v["antialias"], bool):
        raise _bad(where, names["antialias"], f"must be true or false, got {_short(v['antialias'])}")
    spacing_mm = v["slice_spacing_mm"]
    if spacing_mm is not None and not (_is_number(spacing_mm) and spacing_mm > 0):
        raise _bad(where, names["slice_spacing_mm"],
                   f"must be null or a positive number of mm, got {_short(spacing_mm)}")  # fmt: skip
    slice_interp = v["slice_interpolation"]
    if slice_interp not in SLICE_INTERPOLATIONS:
        raise _bad(where, names["slice_interpolation"],
                   f"must be one of {SLICE_INTERPOLATIONS}, got {_short(slice_interp)}")  # fmt: skip
    intensity = check_intensity_values(v, where, names)
    per_slice = len(intensity["ct_windows"]) if intensity["ct_window_mode"] == "channels" else 1
    if len(offsets) * per_slice > LIMITS["in_chans"]:
        raise _bad(where, names["slice_offsets"], f"with the CT windows make {len(offsets) * per_slice} channels, "
                   f"more than {LIMITS['in_chans']}")  # fmt: skip
    return {
        "axis": axis,
        "image_size": (size[0], size[1]),
        "slice_offsets": tuple(offsets),
        "interpolation": interp,
        "antialias": v["antialias"],
        **intensity,
        "slice_spacing_mm": None if spacing_mm is None else float(spacing_mm),
        "slice_interpolation": slice_interp,
    }


def check_volume_values(v: Mapping[str, Any], where: str, names: Mapping[str, str]) -> dict[str, Any]:
    """Every value of a 3D preprocessing (``VolumePreprocessor``'s fields), checked and bounded."""
    size, side = v["size"], LIMITS["img_size"]
    if (
        not isinstance(size, list | tuple)
        or len(size) != 3
        or not all(isinstance(s, int) and not isinstance(s, bool) and 1 <= s <= side for s in size)
    ):
        raise _bad(where, names["size"], f"must be three ints [Z, Y, X], each 1 to {side}, got {_short(size)}")
    if math.prod(size) > LIMITS["voxels"]:
        raise _bad(where, names["size"], f"{list(size)} exceeds {LIMITS['voxels']} voxels per window")
    spacing = v["spacing_mm"]
    if not isinstance(spacing, list | tuple) or len(spacing) != 3 or not all(_is_number(s) for s in spacing):
        raise _bad(where, names["spacing_mm"], f"must be three numbers, got {_short(spacing)}")
    if not all(s > 0 for s in spacing):
        raise _bad(where, names["spacing_mm"], f"must be three finite numbers > 0 (mm), got {_short(spacing)}")
    return {
        "size": (size[0], size[1], size[2]),
        "spacing_mm": (float(spacing[0]), float(spacing[1]), float(spacing[2])),
        **check_intensity_values(v, where, names),
    }


def check_input_norm(norm: Any, channels: int, where: str) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """``input_norm`` of a record: null, or ``[mean, std]`` with one finite value per channel, std > 0."""
    if norm is None:
        return None
    if not isinstance(norm, list | tuple) or len(norm) != 2:
        raise _bad(where, "input_norm", f"must be null or [mean, std], got {_short(norm)}")
    mean, std = norm
    for name, values in (("mean", mean), ("std", std)):
        if not isinstance(values, list | tuple) or len(values) != channels or not all(_is_number(x) for x in values):
            raise _bad(where, f"input_norm.{name}", f"must be {channels} finite number(s), got {_short(values)}")
    if not all(s > 0 for s in std):
        raise _bad(where, "input_norm.std", f"must be > 0 for every channel, got {_short(std)}")
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)
