"""CacheDataModule: loaders, determinism across workers and epochs, sharding, setup drops, arguments."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from torch.utils.data import DistributedSampler

from medmae.data import (
    CacheDataModule,
    EpochWeightedSampler,
    IntensityOptions,
    LoaderOptions,
    NoUsableDataError,
    SamplingOptions,
    SelectionOptions,
)
from tests.data.conftest import CacheBuilder, noise_volume

SMALL = {
    "img_size": 32,
    "batch_size": 4,
    "selection": SelectionOptions(min_size=8),
    "sampling": SamplingOptions(samples_per_epoch=24),
    "slices": 3,
}


def _epoch(dm: CacheDataModule, loader, epoch: int) -> list[dict[str, torch.Tensor]]:
    loader.sampler.set_epoch(epoch)
    return list(loader)


def _assert_same(a: list[dict[str, torch.Tensor]], b: list[dict[str, torch.Tensor]]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]), k


def test_batches_have_the_promised_shape_and_keys(noise_cache: Callable[[], Path]) -> None:
    small = SelectionOptions(min_size=8)
    dm = CacheDataModule(str(noise_cache()), img_size=(24, 40), slices=3, batch_size=4, num_workers=0, selection=small)
    assert dm.channels == 3 and dm.image_size == (24, 40)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 3, 24, 40) and batch["image"].dtype == torch.float32
    assert 0.0 <= float(batch["image"].min()) and float(batch["image"].max()) <= 1.0
    assert set(batch) == {"image", "index", "epoch", "series", "slice", "skipped", "rejected"}
    assert batch["epoch"].tolist() == [0] * 4
    assert dm.setup_report["train"]["series"] == 4 and dm.setup_report["train"]["slices"] == 31
    assert dm.setup_report["val"]["series"] == 1


def test_same_batches_for_0_and_2_workers_and_new_ones_each_epoch(noise_cache: Callable[[], Path]) -> None:
    cache = str(noise_cache())
    dm0 = CacheDataModule(cache, num_workers=0, **SMALL)
    dm2 = CacheDataModule(cache, num_workers=2, loader=LoaderOptions(persistent_workers=True), **SMALL)
    dm0.setup("fit")
    dm2.setup("fit")
    loader0, loader2 = dm0.train_dataloader(), dm2.train_dataloader()
    e0 = _epoch(dm0, loader0, 0)
    _assert_same(e0, _epoch(dm2, loader2, 0))
    e1 = _epoch(dm2, loader2, 1)  # the same persistent workers, next epoch
    _assert_same(e1, _epoch(dm0, loader0, 1))
    assert not torch.equal(e0[0]["image"], e1[0]["image"])
    assert not torch.equal(torch.cat([b["slice"] for b in e0]), torch.cat([b["slice"] for b in e1]))
    # validation is the same every time, whatever the workers
    _assert_same(list(dm0.val_dataloader()), list(dm2.val_dataloader()))
    _assert_same(list(dm0.val_dataloader()), list(dm0.val_dataloader()))


def test_epoch_advances_by_itself_without_set_epoch(noise_cache: Callable[[], Path]) -> None:
    dm = CacheDataModule(str(noise_cache()), num_workers=0, **SMALL)
    dm.setup("fit")
    loader = dm.train_dataloader()
    first, second = list(loader), list(loader)
    assert not torch.equal(first[0]["image"], second[0]["image"])
    loader.sampler.set_epoch(1)
    _assert_same(second, list(loader))


def test_each_rank_sees_a_distinct_part(noise_cache: Callable[[], Path]) -> None:
    dm = CacheDataModule(str(noise_cache()), num_workers=0, **SMALL)
    dm.setup("fit")
    index = dm.train_dataset.index
    ranks = [EpochWeightedSampler(index, 25, seed=0, num_replicas=2, rank=r) for r in (0, 1)]
    assert all(isinstance(s, DistributedSampler) for s in ranks)  # Lightning keeps it, calls set_epoch
    keys = [list(s) for s in ranks]
    assert len(keys[0]) == len(keys[1]) == 12  # the 25th draw is dropped so ranks step together
    draws = [{k.draw for k in ks} for ks in keys]
    assert not draws[0] & draws[1] and draws[0] | draws[1] == set(range(24))
    everything = ranks[0].epoch_positions(0)
    assert all(k.position == everything[k.draw] for ks in keys for k in ks)


def test_unreadable_entries_are_dropped_at_setup_with_a_count(
    cache_builder: CacheBuilder, caplog: pytest.LogCaptureFixture
) -> None:
    for i in range(4):
        cache_builder.add(f"ct{i}", noise_volume(i))
    cache = cache_builder.write()
    os.remove(cache_builder.array_path("ct0"))
    path = cache_builder.array_path("ct3")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 100)
    caplog.set_level(logging.WARNING, logger="medmae.data")
    dm = CacheDataModule(str(cache), num_workers=0, **SMALL)
    dm.setup("fit")
    assert dm.setup_report["train"]["series"] == 2
    assert dm.setup_report["train"]["dropped"] == {"missing_array": 1, "unreadable_array": 1}
    assert any("dropped 2 unreadable cache entries" in r.getMessage() for r in caplog.records)
    assert next(iter(dm.train_dataloader()))["image"].shape == (4, 3, 32, 32)


def test_nothing_usable_raises_a_clear_error(cache_builder: CacheBuilder) -> None:
    cache_builder.add("ct0", noise_volume(0))
    cache_builder.add("mr0", noise_volume(1), modality="MR")
    cache = cache_builder.write()
    with pytest.raises(NoUsableDataError, match=r"2 train series, dropped \{'modality': 2\}"):
        pet = SelectionOptions(modalities=["PT"], min_size=8)
        CacheDataModule(str(cache), selection=pet, num_workers=0).setup("fit")
    for sid in ("ct0", "mr0"):
        os.remove(cache_builder.array_path(sid))
    with pytest.raises(NoUsableDataError, match="missing_array"):
        CacheDataModule(str(cache), num_workers=0, selection=SelectionOptions(min_size=8)).setup("fit")


def test_no_validation_series_skips_validation(cache_builder: CacheBuilder) -> None:
    cache_builder.add("ct0", noise_volume(0))
    dm = CacheDataModule(str(cache_builder.write()), num_workers=0, **SMALL)
    dm.setup("fit")
    with pytest.warns(UserWarning, match="no usable validation series"):
        assert dm.val_dataloader() == []


def test_val_samples_draws_a_fixed_subset(noise_cache: Callable[[], Path]) -> None:
    sampling = SamplingOptions(samples_per_epoch=24, val_samples=6)
    dm = CacheDataModule(str(noise_cache()), num_workers=0, **{**SMALL, "sampling": sampling})
    dm.setup("validate")
    batches = list(dm.val_dataloader())
    assert sum(len(b["image"]) for b in batches) == 6
    assert dm.train_dataset is None


def test_windows_as_channels_multiply_channels(noise_cache: Callable[[], Path]) -> None:
    channels = IntensityOptions(ct_window_mode="channels")
    dm = CacheDataModule(str(noise_cache()), num_workers=0, intensity=channels, **SMALL)
    assert dm.channels == 9
    dm.setup("fit")
    assert next(iter(dm.train_dataloader()))["image"].shape == (4, 9, 32, 32)


def test_preprocessing_is_json_and_has_no_path(noise_cache: Callable[[], Path]) -> None:
    cache = noise_cache()
    dm = CacheDataModule(str(cache), num_workers=0, seed=7, **SMALL)
    record = json.loads(json.dumps(dm.preprocessing()))
    assert str(cache) not in json.dumps(record) and "cache" not in json.dumps(record).lower().replace(
        "medmae cache", ""
    )
    assert record["seed"] == 7 and record["slices"] == 3 and record["axis"] == "axial"
    assert record["crop"]["scale"] == [0.2, 1.0] and record["hflip_prob"] == 0.5
    assert record["intensity"]["ct"]["windows_level_width"] == [[40.0, 400.0], [-600.0, 1500.0], [400.0, 1800.0]]
    assert record["sampling"]["alpha"] == 0.5 and record["foreground"]["enabled"] is False


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("img_size", 0),
        ("img_size", (224, 0, 3)),
        ("slices", 0),
        ("axis", "oblique"),
        ("batch_size", 0),
        ("num_workers", -1),
        ("seed", -1),
        ("slice_spacing_mm", 0),
        ("slice_spacing_mm", float("nan")),
        ("slice_interpolation", "cubic"),
        ("cache_changed", "ignore"),
    ],
)
def test_bad_arguments_raise_value_error_naming_the_field(field: str, value: object) -> None:
    """The flat options; the sections' own checks are in tests/data/test_options.py."""
    with pytest.raises(ValueError, match=field):
        CacheDataModule("cache", **{field: value})


def test_lightning_cli_style_yaml_parses(noise_cache: Callable[[], Path]) -> None:
    jsonargparse = pytest.importorskip("jsonargparse")
    parser = jsonargparse.ArgumentParser()
    parser.add_class_arguments(CacheDataModule, "data")
    cfg = parser.parse_string(
        f"data:\n  cache_dir: {noise_cache()}\n  img_size: [24, 32]\n  slices: 3\n  num_workers: 0\n"
        "  intensity: {ct_windows: [[40, 400], [-600, 1500]], ct_inference_window: 1}\n"
        "  crop: {crop_scale: [0.3, 1.0]}\n  selection: {modalities: [CT]}\n"
        "  slice_spacing_mm: 2.5\n  slice_interpolation: linear\n"
    )
    dm = parser.instantiate_classes(cfg).data
    assert dm.image_size == (24, 32) and dm.channels == 3
    assert dm.transform.neighbours.spacing_mm == 2.5 and dm.transform.neighbours.interpolation == "linear"
    assert dm.preprocessing()["intensity"]["ct"]["inference_window"] == 1
    assert dm.transform.intensity.ct_windows == ((40.0, 400.0), (-600.0, 1500.0)) and dm.selection.modalities == ("CT",)
    assert dm.transform.crop_scale == (0.3, 1.0) and dm.preprocessing()["selection"]["modalities"] == ["CT"]


class _Probe(pl.LightningModule):
    """Records what the trainer feeds it; learns nothing worth keeping."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(1, 1)
        self.seen: list[tuple[int, torch.Tensor]] = []
        self.val_batches = 0

    def training_step(self, batch, batch_idx):
        self.seen.append((self.current_epoch, batch["image"].clone()))
        return self.layer(batch["image"].mean(dim=(1, 2, 3))[:, None]).mean()

    def validation_step(self, batch, batch_idx):
        self.val_batches += 1

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_lightning_fit_sets_epochs_and_runs_validation(noise_cache: Callable[[], Path]) -> None:
    dm = CacheDataModule(str(noise_cache()), num_workers=0, **SMALL)
    probe = _Probe()
    trainer = pl.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(probe, datamodule=dm)
    assert [e for e, _ in probe.seen] == [0] * 6 + [1] * 6
    assert not torch.equal(probe.seen[0][1], probe.seen[6][1])
    assert probe.val_batches == 2 * 3  # 10 val slices, batch 4, every epoch
    assert isinstance(trainer.train_dataloader.sampler, EpochWeightedSampler)
    np.testing.assert_equal(trainer.train_dataloader.sampler.epoch, 1)


class _DrawRecorder(_Probe):
    def __init__(self, out: Path) -> None:
        super().__init__()
        self.out = out

    def on_train_epoch_end(self) -> None:
        draws = [int(i) for _, b in self.seen for i in b]
        (self.out / f"rank{self.global_rank}_epoch{self.current_epoch}.json").write_text(json.dumps(draws))
        self.seen.clear()

    def training_step(self, batch, batch_idx):
        self.seen.append((self.current_epoch, batch["index"].clone()))
        return self.layer(batch["image"].mean(dim=(1, 2, 3))[:, None]).mean()


def test_ddp_on_cpu_gives_each_rank_distinct_draws_every_epoch(noise_cache: Callable[[], Path], tmp_path: Path) -> None:
    dm = CacheDataModule(str(noise_cache()), num_workers=0, **SMALL)
    trainer = pl.Trainer(
        max_epochs=2,
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    trainer.fit(_DrawRecorder(tmp_path), datamodule=dm)
    for epoch in (0, 1):
        r0, r1 = (set(json.loads((tmp_path / f"rank{r}_epoch{epoch}.json").read_text())) for r in (0, 1))
        assert len(r0) == len(r1) == 12 and not r0 & r1
        assert r0 | r1 == set(range(24))


def _spacing_cache(cache_builder: CacheBuilder) -> Path:
    """CT volumes of 0.625, 2.5 and 5 mm slices (one patient has two), an MR NIfTI, an X-ray; ids look real."""
    fine, match, thick = (0.625, 0.7, 0.7), (2.5, 0.7, 0.7), (5.0, 0.7, 0.7)
    cache_builder.add("sthin9f2c41d0", noise_volume(0, (24, 32, 32)), spacing=fine, patient_id="pa7ab3e5c1")
    cache_builder.add("smatch9f2c41d0", noise_volume(1, (8, 32, 32)), spacing=match, patient_id="pa7ab3e5c1")
    cache_builder.add("sthick9f2c41d0", noise_volume(2, (6, 32, 32)), spacing=thick, patient_id="pb7ab3e5c1")
    mr = noise_volume(3, (10, 32, 32)).clip(0)
    one_mm = (1.0, 0.7, 0.7)
    cache_builder.add("smr9f2c41d0", mr, modality="MR", source="nifti", spacing=one_mm, patient_id="pc7ab3e5c1")
    xray = np.random.default_rng(5).integers(0, 4000, (1, 40, 40)).astype(np.uint16)
    cache_builder.add("sxr9f2c41d0", xray, modality="DX", kind="image", patient_id="pd7ab3e5c1")
    val = noise_volume(4, (8, 32, 32))
    cache_builder.add("svalct9f2c41d0", val, spacing=match, split="val", patient_id="pv7ab3e5c1")
    return cache_builder.write()


def test_slice_spacing_drops_coarse_series_and_images_and_says_which_option(
    cache_builder: CacheBuilder, caplog: pytest.LogCaptureFixture
) -> None:
    cache = str(_spacing_cache(cache_builder))
    caplog.set_level(logging.INFO, logger="medmae.data")
    dm = CacheDataModule(cache, num_workers=0, slice_spacing_mm=2.5, **SMALL)
    dm.setup("fit")
    assert dm.setup_report["train"]["series"] == 3  # thin, match, mr
    assert dm.setup_report["train"]["dropped"] == {"slice_spacing": 2}  # thick (5 mm) and the X-ray
    assert any("data.slice_spacing_mm=2.5" in r.getMessage() for r in caplog.records)
    record = dm.preprocessing()
    assert record["slice_spacing_mm"] == 2.5 and record["slice_offsets_mm"] == [-2.5, 0.0, 2.5]
    assert record["slice_interpolation"] == "nearest" and record["selection"]["slice_spacing_mm"] == 2.5
    assert "not used" in record["images"]
    assert next(iter(dm.train_dataloader()))["image"].shape == (4, 3, 32, 32)
    # the option means nothing for 2D samples: nothing is dropped for it
    flat = CacheDataModule(cache, num_workers=0, slice_spacing_mm=2.5, **{**SMALL, "slices": 1})
    flat.setup("fit")
    assert flat.setup_report["train"]["series"] == 5 and flat.preprocessing()["slice_spacing_mm"] is None
    # nothing left: the error names the option
    with pytest.raises(NoUsableDataError, match=r"data\.slice_spacing_mm=0\.5"):
        CacheDataModule(cache, num_workers=0, slice_spacing_mm=0.5, **SMALL).setup("fit")


def test_training_data_composition_counts_the_split_actually_used(cache_builder: CacheBuilder) -> None:
    cache = str(_spacing_cache(cache_builder))
    dm = CacheDataModule(cache, num_workers=0, slice_spacing_mm=2.5, **SMALL)
    assert dm.preprocessing()["training_data"] is None  # not set up: nothing to count yet
    dm.setup("fit")
    data = json.loads(json.dumps(dm.preprocessing()["training_data"]))
    assert (data["series"], data["slices"], data["patients"]) == (3, 42, 2)
    assert data["by_modality"] == {
        "CT": {"series": 2, "slices": 32, "patients": 1},
        "MR": {"series": 1, "slices": 10, "patients": 1},
    }
    assert data["by_source"] == {
        "dicom": {"series": 2, "slices": 32, "patients": 1},
        "nifti": {"series": 1, "slices": 10, "patients": 1},
    }
    assert data["by_kind"] == {"volume": {"series": 3, "slices": 42, "patients": 2}}
    assert data["dropped"] == {"slice_spacing": 2} and data["split"] == "train"
    text = json.dumps(dm.preprocessing())
    for row in dm.train_dataset.index.rows:
        assert row.series_id not in text and row.patient_id not in text
