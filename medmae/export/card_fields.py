"""The card's ``preprocessing`` fields both rebuilt preprocessings read: 2D/2.5D and 3D alike.

The plane preprocessing (:mod:`medmae.export.preprocessing`) and the volume preprocessing
(:mod:`medmae.export.volume_preprocessing`) share the field lookup (:func:`card_field`, whose
:class:`~medmae.export.card.CardError` names the missing field), the intensity section
(:func:`intensity_from_card`) and pretraining's intensity rule with its random choice fixed
(:func:`inference_ranges`). They live here, below both, so each of them imports only downward.

Example::

    size = card_field(card["preprocessing"], "volume.size", "encoder3d/card.json")
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from medmae.data.intensity import IntensityRule
from medmae.export.card import CARD_FIELDS, CardError, check_intensity_values


def card_field(pre: Mapping[str, Any], path: str, where: str) -> Any:
    """The value at the dotted ``path`` of a card's ``preprocessing`` section ``pre``; :class:`CardError`
    naming ``where`` and ``preprocessing.<path>`` when it is missing."""
    node: Any = pre
    for part in path.split("."):
        if not isinstance(node, Mapping) or part not in node:
            raise CardError(f"{where}: field 'preprocessing.{path}' is missing")
        node = node[part]
    return node


def intensity_from_card(pre: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The checked ``intensity`` section (2D and 3D cards share it): the fields of both preprocessors
    (checked and bounded by :func:`medmae.export.card.check_intensity_values`, the checks fine-tuning
    checkpoint records get too)."""
    values = {
        "ct_windows": card_field(pre, "intensity.ct.windows_level_width", where),
        "ct_window_mode": card_field(pre, "intensity.ct.mode", where),
        "inference_window": pre["intensity"]["ct"].get("inference_window", 0),
        "percentiles": card_field(pre, "intensity.other.percentiles", where),
    }
    return check_intensity_values(values, where, CARD_FIELDS)


def inference_ranges(
    ct_windows: Sequence[tuple[float, float]],
    ct_window_mode: str,
    inference_window: int,
    percentiles: tuple[float, float],
    intensity: str,
    stats: Mapping[str, float],
) -> list[tuple[float, float]]:
    """The ``(low, high)`` ranges fine-tuning and inference map to [0, 1], one per channel group (2D and 3D).

    Pretraining's own rule with its one random choice fixed
    (:meth:`medmae.data.intensity.IntensityRule.inference_ranges`): in ``random`` mode the window
    ``inference_window``, in ``channels`` mode every window; non-HU series get the stored percentiles.
    """
    rule = IntensityRule(
        tuple((float(lv), float(wd)) for lv, wd in ct_windows),
        ct_window_mode,
        int(inference_window),
        (float(percentiles[0]), float(percentiles[1])),
    )
    return rule.inference_ranges(intensity, stats)
