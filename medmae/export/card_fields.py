"""The card's checks on the input transforms' record: the transforms themselves live in ``medmae.data``.

The export card keeps the pretraining record (``CacheDataModule.preprocessing()``) as its
``preprocessing`` section; :func:`medmae.data.transform_record.build_transform` reads it back into
the plane (:mod:`medmae.data.plane_transform`) or volume (:mod:`medmae.data.volume_transform`)
transform. A card is read from disk, so here that builder runs with the card's one validator
(:data:`CARD_CHECKS`: :func:`~medmae.export.card.check_plane_values`,
:func:`~medmae.export.card.check_volume_values`, :func:`~medmae.export.card.check_intensity_values`,
whose :class:`~medmae.export.card.CardError` names the field). ``medmae.data`` imports nothing from here.

Example::

    pre = preprocessing_from_card(load_card("encoder3d/"))      # a VolumePreprocessor
    size = card_field(card["preprocessing"], "volume.size", "encoder3d/encoder.json")
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from medmae.data.intensity import IntensityRule
from medmae.data.plane_transform import PlanePreprocessor
from medmae.data.transform_record import (
    RecordChecks,
    Transform,
    build_transform,
    intensity_values,
    plane_from_record,
    record_field,
    volume_from_record,
)
from medmae.data.volume_transform import VolumePreprocessor
from medmae.export.card import CARD_FIELDS, CardError, check_intensity_values, check_plane_values, check_volume_values

#: the card's validator, for the transform builder of ``medmae.data``
CARD_CHECKS = RecordChecks(
    CardError,
    intensity=lambda values, where: check_intensity_values(values, where, CARD_FIELDS),
    plane=lambda values, where: check_plane_values(values, where, CARD_FIELDS),
    volume=lambda values, where: check_volume_values(values, where, CARD_FIELDS),
)


def preprocessing_from_card(card: Mapping[str, Any], where: str = "card") -> Transform:
    """Rebuild the pretraining preprocessing from a card (as returned by :func:`load_card`).

    2D / 2.5D cards (no ``preprocessing.spatial_dims``, or 2) give a :class:`PlanePreprocessor`; 3D
    cards (``spatial_dims: 3``) a :class:`VolumePreprocessor` (:func:`medmae.data.transform_record.build_transform`
    with the card's checks). Raises :class:`CardError` naming ``where`` (the card's file) and the field
    when the record is missing or malformed.
    """
    pre = card.get("preprocessing")
    if not isinstance(pre, Mapping) or not pre:
        raise CardError(f"{where}: field 'preprocessing' is missing or empty (the encoder was exported without data)")
    return build_transform(card, where, CARD_CHECKS)  # the card itself: its section is read, never a nested one


def plane_preprocessing_from_card(pre: Mapping[str, Any], where: str = "card") -> PlanePreprocessor:
    """The 2D / 2.5D half of :func:`preprocessing_from_card` (``pre``: the card's ``preprocessing``)."""
    return plane_from_record(pre, where, CARD_CHECKS)


def volume_preprocessing_from_card(pre: Mapping[str, Any], where: str = "card") -> VolumePreprocessor:
    """The 3D half of :func:`preprocessing_from_card` (``pre``: the card's ``preprocessing``, ``spatial_dims: 3``)."""
    return volume_from_record(pre, where, CARD_CHECKS)


def card_field(pre: Mapping[str, Any], path: str, where: str) -> Any:
    """The value at the dotted ``path`` of a card's ``preprocessing`` section; :class:`CardError` naming
    ``where`` and ``preprocessing.<path>`` when it is missing."""
    return record_field(pre, path, where, CardError)


def intensity_from_card(pre: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The checked ``intensity`` section (2D and 3D cards share it): the transforms' intensity fields."""
    return intensity_values(pre, where, CARD_CHECKS)


def inference_ranges(
    ct_windows: Sequence[tuple[float, float]],
    ct_window_mode: str,
    inference_window: int,
    percentiles: tuple[float, float],
    intensity: str,
    stats: Mapping[str, float],
) -> list[tuple[float, float]]:
    """Pretraining's intensity rule with its random choice fixed (:meth:`IntensityRule.inference_ranges`)."""
    windows = tuple((float(lv), float(wd)) for lv, wd in ct_windows)
    rule = IntensityRule(windows, ct_window_mode, int(inference_window), (float(percentiles[0]), float(percentiles[1])))
    return rule.inference_ranges(intensity, stats)
