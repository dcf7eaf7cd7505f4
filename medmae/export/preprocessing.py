"""Compatibility: the plane transform moved to :mod:`medmae.data.plane_transform`, the builder to
:mod:`medmae.data.transform_record` (issue 19); the card's checks are in :mod:`medmae.export.card_fields`."""

from medmae.data.plane_transform import PadBox, PlanePreprocessor
from medmae.export.card_fields import plane_preprocessing_from_card, preprocessing_from_card
from medmae.export.volume_preprocessing import VolumePreprocessor, volume_preprocessing_from_card

__all__ = ["PadBox", "PlanePreprocessor", "VolumePreprocessor", "plane_preprocessing_from_card",
           "preprocessing_from_card", "volume_preprocessing_from_card"]  # fmt: skip
