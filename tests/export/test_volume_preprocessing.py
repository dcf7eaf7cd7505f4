"""preprocessing_from_card on 3D cards: the card's checks on the volume transform's record (the transform
itself is medmae.data.volume_transform, tested in tests/data/test_volume_transform.py), and the old
import paths (benchmarks/transfer3d.py uses ``medmae.export.volume_preprocessing``)."""

from __future__ import annotations

import pytest

from medmae.data.intensity import IntensityRule
from medmae.data.transform_record import build_transform
from medmae.data.volume import VolumeOptions, VolumeTransform
from medmae.data.volume_transform import VolumePreprocessor, check_spacing
from medmae.export import CardError, preprocessing_from_card


def card_of(transform: VolumeTransform) -> dict:
    return {"preprocessing": transform.describe()}


def test_a_3d_card_gives_the_volume_transform_of_its_record() -> None:
    rule = IntensityRule.checked(ct_windows=[(40, 400), (-600, 1500)], ct_window_mode="channels")
    transform = VolumeTransform(VolumeOptions(size=8, spacing_mm=1.5), rule)
    pre = preprocessing_from_card(card_of(transform))
    assert isinstance(pre, VolumePreprocessor) and pre == build_transform(transform.describe())
    assert pre.size == (8, 8, 8) and pre.spacing_mm == (1.5, 1.5, 1.5) and pre.channels == transform.channels == 2


def test_channels_that_contradict_the_intensity_section_are_named() -> None:
    card = card_of(VolumeTransform(VolumeOptions(size=8), IntensityRule.checked()))
    card["preprocessing"]["channels"] = 3
    with pytest.raises(CardError, match="enc.json: field 'preprocessing.channels' is 3 but the intensity"):
        preprocessing_from_card(card, where="enc.json")


def test_the_old_import_paths_still_work() -> None:
    from medmae.export import VolumePreprocessor as exported
    from medmae.export.volume_preprocessing import VolumePreprocessor as old
    from medmae.export.volume_preprocessing import check_spacing as old_check
    from medmae.export.volume_preprocessing import volume_preprocessing_from_card

    assert old is exported is VolumePreprocessor and old_check is check_spacing
    card = card_of(VolumeTransform(VolumeOptions(size=8), IntensityRule.checked()))
    assert volume_preprocessing_from_card(card["preprocessing"]) == preprocessing_from_card(card)
