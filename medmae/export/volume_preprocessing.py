"""Compatibility: the volume transform moved to :mod:`medmae.data.volume_transform` (issue 19); the
card's checks are in :mod:`medmae.export.card_fields`."""

from medmae.data.volume_transform import VolumePreprocessor, check_spacing
from medmae.export.card_fields import volume_preprocessing_from_card

__all__ = ["VolumePreprocessor", "check_spacing", "volume_preprocessing_from_card"]
