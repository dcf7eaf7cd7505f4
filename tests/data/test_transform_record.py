"""build_transform: one builder from the pretraining datamodule's record or the export card, which keeps
that record verbatim; the default checks and the card's give the same transform. medmae.data stays below
medmae.export and medmae.finetune."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from medmae.data import CacheDataModule, IntensityOptions
from medmae.data.plane_transform import PlanePreprocessor
from medmae.data.transform_record import TRANSFORMS, build_transform
from medmae.data.volume import VolumeOptions
from medmae.data.volume_transform import VolumePreprocessor
from medmae.export import CardError, export_encoder, load_card, preprocessing_from_card
from medmae.models import create_mae
from medmae.models.mae3d import MaskedAutoencoder3D
from tests.data_prep.test_layering import _graph

pytestmark = pytest.mark.usefixtures("one_thread")

PLANE_CONFIGS = [
    {"img_size": 32},
    {"img_size": (32, 48), "slices": 3, "axis": "coronal", "intensity": IntensityOptions(ct_window_mode="channels")},
    {"img_size": 32, "slices": 5, "intensity": IntensityOptions(ct_inference_window=1)},
    {"img_size": 32, "slices": 3, "axis": "sagittal", "slice_spacing_mm": 2.5, "slice_interpolation": "linear"},
]


def through_json(record: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(record))


@pytest.mark.parametrize("config", PLANE_CONFIGS)
def test_a_plane_record_and_its_card_give_the_same_transform(tmp_path: Path, config: dict[str, Any]) -> None:
    record = CacheDataModule(str(tmp_path / "cache"), **config).preprocessing()
    pre = build_transform(record)
    assert isinstance(pre, PlanePreprocessor) and pre.kind == "volume"
    assert build_transform({"preprocessing": record}) == pre  # a card (a mapping with the section)
    assert build_transform(through_json(record)) == pre  # the card's JSON: lists for tuples
    assert preprocessing_from_card({"preprocessing": through_json(record)}) == pre  # with the card's validator


def test_a_really_exported_card_gives_the_datamodule_records_transform(tmp_path: Path) -> None:
    dm = CacheDataModule(str(tmp_path / "cache"), img_size=32, slices=3, axis="coronal")
    mae = create_mae("mae_vit_tiny_patch16", in_chans=3, img_size=32, depth=2, decoder_depth=1)
    export_encoder(mae, tmp_path / "enc", preprocessing=dm.preprocessing())
    card = load_card(tmp_path / "enc")
    assert card["preprocessing"] == through_json(dm.preprocessing())  # the card's section IS the record
    assert preprocessing_from_card(card) == build_transform(card) == build_transform(dm.preprocessing())


def test_a_volume_record_and_its_exported_card_give_the_same_transform(tmp_path: Path) -> None:
    dm = CacheDataModule(str(tmp_path / "cache"), volume=VolumeOptions(size=(32, 32, 16), spacing_mm=(2.0, 1.5, 1.5)))
    record = dm.preprocessing()
    pre = build_transform(record)
    assert isinstance(pre, VolumePreprocessor) and pre.size == (32, 32, 16) and pre.spacing_mm == (2.0, 1.5, 1.5)
    torch.manual_seed(0)
    model = MaskedAutoencoder3D(img_size=(32, 32, 16), patch_size=16, embed_dim=24, depth=10, num_heads=2,
                                decoder_embed_dim=24, decoder_depth=1, decoder_num_heads=2)  # fmt: skip
    export_encoder(model, tmp_path / "enc3d", preprocessing=record)
    card = load_card(tmp_path / "enc3d")
    assert card["preprocessing"] == through_json(record)
    assert preprocessing_from_card(card) == build_transform(card) == pre


def test_the_record_checks_name_the_field_and_the_card_adds_its_limits(tmp_path: Path) -> None:
    record = through_json(CacheDataModule(str(tmp_path / "cache"), img_size=32).preprocessing())
    del record["axis"]
    with pytest.raises(ValueError, match="dm: field 'preprocessing.axis' is missing") as caught:
        build_transform(record, where="dm")
    assert not isinstance(caught.value, CardError)  # no export type in medmae.data
    with pytest.raises(CardError, match="enc/encoder.json: field 'preprocessing.axis' is missing"):
        preprocessing_from_card({"preprocessing": record}, where="enc/encoder.json")
    for bad in ({}, {"spatial_dims": 4, "axis": "axial"}):
        with pytest.raises(ValueError, match="field 'preprocessing"):
            build_transform(bad)
    huge = through_json(CacheDataModule(str(tmp_path / "cache"), img_size=32).preprocessing())
    huge["image_size"] = [100_000, 32]  # fine for pretraining's objects, beyond the card's limits
    assert build_transform(huge).image_size == (100_000, 32)
    with pytest.raises(CardError, match="preprocessing.image_size"):
        preprocessing_from_card({"preprocessing": huge})


def test_the_transform_of_each_spatial_dims() -> None:
    assert TRANSFORMS == {2: PlanePreprocessor, 3: VolumePreprocessor}
    assert all(t.spatial_dims == d for d, t in TRANSFORMS.items())


def test_medmae_data_imports_neither_export_nor_finetune() -> None:
    graph = _graph(("medmae",), in_functions=True)
    assert "medmae.data.plane_transform" in graph["medmae.data.transform_record"], "the graph is read"
    upward = sorted(
        f"{module} -> {target}"
        for module, targets in graph.items()
        if module.startswith("medmae.data")
        for target in targets
        if target.startswith(("medmae.export", "medmae.finetune", "medmae.train"))
    )
    assert not upward, f"medmae.data must not import the layers above it: {upward}"
