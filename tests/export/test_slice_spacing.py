"""2.5D channels at the same millimetres in every series: the training dataset and the card's
PlanePreprocessor place them alike, and agree with each other sample for sample."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from medmae.data import CacheDataModule, CacheSliceDataset, IntensityOptions, SampleKey, SelectionOptions
from medmae.data.cache import load_manifest
from medmae.export import CardError, preprocessing_from_card
from tests.data.conftest import CacheBuilder

#: A window showing -500..500 HU: a stored value v comes out as (v + 500) / 1000 (no clipping here).
WINDOW = [[0.0, 1000.0]]
#: HU per millimetre along Z: every plane carries its own position (8 * z_mm - 160), so a channel's
#: value says where along the axis it was read.
HU_PER_MM = 8.0
SIZE = 16
#: The same anatomy, 40 mm long, cut at three slice spacings (mm): plane counts 65, 41, 17.
SPACINGS = {"thin": 0.625, "one": 1.0, "coarse": 2.5}


def anatomy(spacing: float) -> np.ndarray:
    """(Z, 16, 16) int16 HU: ``8 * z_mm - 160`` plus a fixed in-plane pattern (so crops are not flat)."""
    z_mm = np.arange(int(round(40 / spacing)) + 1) * spacing
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    values = HU_PER_MM * z_mm[:, None, None] - 160 + 3 * x[None] - 2 * y[None]
    assert np.array_equal(values, np.round(values))
    return values.astype(np.int16)


@pytest.fixture
def mm_cache(cache_builder: CacheBuilder) -> Path:
    for name, spacing in SPACINGS.items():
        cache_builder.add(name, anatomy(spacing), spacing=(spacing, 0.7, 0.7))
    return cache_builder.write()


def data_module(cache: Path, **kwargs) -> CacheDataModule:
    dm = CacheDataModule(
        str(cache), img_size=SIZE, slices=3, intensity=IntensityOptions(ct_windows=WINDOW),
        selection=SelectionOptions(min_size=8), num_workers=0, batch_size=1, **kwargs
    )
    dm.setup("fit")
    return dm


def position(dm: CacheDataModule, name: str, centre_mm: float) -> int:
    """The flat index position of the plane at ``centre_mm`` of series ``name``."""
    index = dm.train_dataset.index
    series = [r.series_id for r in index.rows].index(name)
    return int(index.offsets[series]) + int(round(centre_mm / SPACINGS[name]))


def channel_offsets_mm(image: torch.Tensor) -> np.ndarray:
    """Where each channel was read, relative to the centre channel, in mm (from the HU ramp)."""
    diff = (image - image[1:2]) * 1000.0 / HU_PER_MM  # constant over the plane whatever the crop
    assert float(diff.std(dim=(1, 2)).max()) < 1e-3
    return diff.mean(dim=(1, 2)).numpy()


@pytest.mark.parametrize("interpolation", ["nearest", "linear"])
def test_thin_and_coarse_series_give_channels_at_the_same_millimetres(mm_cache: Path, interpolation: str) -> None:
    dm = data_module(mm_cache, slice_spacing_mm=2.5, slice_interpolation=interpolation)
    pre = preprocessing_from_card({"preprocessing": dm.preprocessing()})
    rows = {r.series_id: r for r in load_manifest(mm_cache).rows}
    # nearest: a 1 mm series has no plane at +-2.5 mm and reads +-3 mm (ties away from the centre)
    names = ("thin", "coarse") if interpolation == "nearest" else ("thin", "one", "coarse")
    for centre_mm, expected in ((20.0, [-2.5, 0.0, 2.5]), (0.0, [0.0, 0.0, 2.5]), (40.0, [-2.5, 0.0, 0.0])):
        for name in names:
            # the training path: random-resized crop, flip and resize of the real dataset
            sample = dm.train_dataset[SampleKey(0, 0, position(dm, name, centre_mm))]
            np.testing.assert_allclose(channel_offsets_mm(sample["image"]), expected, atol=1e-3, err_msg=name)
            # the fine-tuning / inference path: the card alone, the volume and its spacing
            centre = int(round(centre_mm / SPACINGS[name]))
            x = pre.planes(anatomy(SPACINGS[name]), "HU", rows[name].stats, [centre], spacing=rows[name].spacing)[0]
            np.testing.assert_allclose(channel_offsets_mm(x), expected, atol=1e-3, err_msg=name)
            hu = x[:, 0, 0].numpy() * 1000.0 - 500.0  # pixel (0, 0) holds 8 * z_mm - 160
            np.testing.assert_allclose(hu, HU_PER_MM * (centre_mm + np.array(expected)) - 160, atol=2e-3)


def test_index_adjacency_still_puts_channels_one_plane_apart(mm_cache: Path) -> None:
    """The default (and every card without ``slice_spacing_mm``): what the option fixes."""
    dm = data_module(mm_cache)
    for name, spacing in (("thin", 0.625), ("coarse", 2.5)):
        sample = dm.train_dataset[SampleKey(0, 0, position(dm, name, 20.0))]
        np.testing.assert_allclose(channel_offsets_mm(sample["image"]), [-spacing, 0.0, spacing], atol=1e-3)


@pytest.mark.parametrize("interpolation", ["nearest", "linear"])
def test_training_samples_and_card_preprocessing_agree(mm_cache: Path, interpolation: str) -> None:
    dm = data_module(mm_cache, slice_spacing_mm=2.5, slice_interpolation=interpolation)
    pre = preprocessing_from_card({"preprocessing": dm.preprocessing()})
    index = dm.train_dataset.index
    # pretraining's validation view: centre crop (the whole square plane), no flip, no resize here
    view = CacheSliceDataset(mm_cache, index, dm.transform, random_crop=False)
    rows = {r.series_id: r for r in load_manifest(mm_cache).rows}
    for name in ("thin", "one", "coarse"):
        volume = anatomy(SPACINGS[name])
        centres = [0, 1, len(volume) // 2, len(volume) - 1]
        expected = pre.planes(volume, "HU", rows[name].stats, centres, spacing=rows[name].spacing)
        series = [r.series_id for r in index.rows].index(name)
        got = torch.stack([view[int(index.offsets[series]) + c]["image"] for c in centres])
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_the_option_draws_no_randomness(cache_builder: CacheBuilder) -> None:
    """On 1 mm series, 1 mm offsets are index adjacency: the very same samples (crops, flips, windows)."""
    cache_builder.add("ct", anatomy(1.0), spacing=(1.0, 0.7, 0.7))
    cache_builder.add("mr", anatomy(1.0)[::-1] + 200, modality="MR", spacing=(1.0, 0.7, 0.7))
    cache = str(cache_builder.write())
    common = {"img_size": 8, "slices": 3, "selection": SelectionOptions(min_size=8), "num_workers": 0,
              "intensity": IntensityOptions(ct_windows=[[0, 1000], [40, 400]])}
    by_index, by_mm = CacheDataModule(cache, **common), CacheDataModule(cache, slice_spacing_mm=1.0, **common)
    by_index.setup("fit")
    by_mm.setup("fit")
    assert len(by_mm.train_dataset.index) == len(by_index.train_dataset.index) == 82
    for draw, pos in enumerate(range(0, 82, 3)):
        a, b = by_index.train_dataset[SampleKey(0, draw, pos)], by_mm.train_dataset[SampleKey(0, draw, pos)]
        torch.testing.assert_close(a["image"], b["image"], rtol=0, atol=0)


def test_cards_state_the_rule_and_reject_bad_values(mm_cache: Path) -> None:
    record = data_module(mm_cache, slice_spacing_mm=2.5, slice_interpolation="linear").preprocessing()
    pre = preprocessing_from_card({"preprocessing": record})
    assert (pre.slice_spacing_mm, pre.slice_interpolation) == (2.5, "linear")
    with pytest.raises(ValueError, match="spacing"):  # the card needs the volume's spacing
        pre.planes(anatomy(1.0), "HU", {"min": -160.0}, [3])
    old = {k: v for k, v in record.items() if k not in ("slice_spacing_mm", "slice_interpolation")}
    legacy = preprocessing_from_card({"preprocessing": old})  # cards from before the option
    assert legacy.slice_spacing_mm is None and not legacy.neighbours.by_distance
    for field, value in (("slice_spacing_mm", -1), ("slice_spacing_mm", "2.5"), ("slice_interpolation", "cubic")):
        with pytest.raises(CardError, match=f"enc/encoder.json: field 'preprocessing.{field}'"):
            preprocessing_from_card({"preprocessing": {**record, field: value}}, where="enc/encoder.json")
