"""preprocessing_from_card: the card's checks on the plane transform's record (the transform itself is
medmae.data.plane_transform, tested in tests/data/test_plane_transform.py), and the old import paths."""

import numpy as np
import pytest

from medmae.data import CacheDataModule, IntensityOptions
from medmae.data.plane_transform import PadBox, PlanePreprocessor
from medmae.data.transform_record import build_transform
from medmae.export import CardError, preprocessing_from_card


def card_for(tmp_path, **data_kwargs) -> dict:
    return {"preprocessing": CacheDataModule(str(tmp_path / "cache"), **data_kwargs).preprocessing()}


def test_a_2d_card_gives_the_plane_transform_of_its_record(tmp_path) -> None:
    card = card_for(tmp_path, img_size=8, slices=3, axis="coronal")
    pre = preprocessing_from_card(card)
    assert isinstance(pre, PlanePreprocessor) and pre == build_transform(card["preprocessing"])
    assert pre.axis == "coronal" and pre.slice_offsets == (-1, 0, 1) and pre.kind == "volume"


def test_the_old_import_paths_still_work() -> None:
    from medmae.export import PlanePreprocessor as exported
    from medmae.export.preprocessing import PadBox as old_box
    from medmae.export.preprocessing import PlanePreprocessor as old
    from medmae.export.preprocessing import plane_preprocessing_from_card
    from medmae.export.preprocessing import preprocessing_from_card as old_fn

    assert old is exported is PlanePreprocessor and old_box is PadBox and old_fn is preprocessing_from_card
    assert callable(plane_preprocessing_from_card)


@pytest.mark.parametrize("field", ["axis", "image_size", "slice_offsets"])
def test_missing_fields_are_named(tmp_path, field: str) -> None:
    card = card_for(tmp_path, img_size=8)
    del card["preprocessing"][field]
    with pytest.raises(CardError, match=f"enc/encoder.json: field 'preprocessing.{field}'"):
        preprocessing_from_card(card, where="enc/encoder.json")


def test_a_card_without_preprocessing_is_named() -> None:
    for card in ({}, {"preprocessing": {}}, {"preprocessing": [1]}):
        with pytest.raises(CardError, match="enc.json: field 'preprocessing' is missing or empty"):
            preprocessing_from_card(card, where="enc.json")


def test_ct_inference_window_is_written_and_used(tmp_path) -> None:
    hu = np.full((1, 4, 4), -600, np.int16)  # lung window centre
    stats = {"min": -600.0}
    card = card_for(tmp_path, img_size=4, intensity=IntensityOptions(ct_inference_window=1))
    assert card["preprocessing"]["intensity"]["ct"]["inference_window"] == 1
    assert float(preprocessing_from_card(card).planes(hu, "HU", stats)[0, 0, 0, 0]) == pytest.approx(0.5)
    del card["preprocessing"]["intensity"]["ct"]["inference_window"]  # cards from before the option
    assert preprocessing_from_card(card).inference_window == 0
    card["preprocessing"]["intensity"]["ct"]["inference_window"] = 3
    with pytest.raises(CardError, match="field 'preprocessing.intensity.ct.inference_window'"):
        preprocessing_from_card(card)


def test_card_states_the_percentile_rule_in_full(tmp_path) -> None:
    other = card_for(tmp_path)["preprocessing"]["intensity"]["other"]
    assert other["percentiles"] == [0.5, 99.5]
    rule = other["percentile_rule"]
    assert set(rule) >= {"voxels", "values", "method"}
    assert "every stored voxel of the whole series" in rule["voxels"]
    assert "no VOI LUT" in rule["values"] and "MONOCHROME1" in rule["values"]
