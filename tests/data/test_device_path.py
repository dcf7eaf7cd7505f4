"""The GPU data path, run on CPU tensors, gives the CPU path's samples: same values, same RNG draws."""

from pathlib import Path

import numpy as np
import pytest
import torch

from medmae.data import CacheDataModule, CropOptions, LoaderOptions, SamplingOptions, SelectionOptions
from medmae.data.device_path import RAW_KEYS, collate_raw, finish_on_device
from medmae.data.sampler import SampleKey
from tests.data.conftest import CacheBuilder, noise_volume


@pytest.fixture
def mixed_cache(cache_builder: CacheBuilder) -> Path:
    """CT in HU (int16), MR as float32, an X-ray image (uint16), and a val series."""
    cache_builder.add("ct0", noise_volume(0, (9, 50, 44)))
    mr = np.random.default_rng(1).gamma(2.0, 100.0, (9, 40, 48)).astype(np.float32)
    cache_builder.add("mr0", mr, modality="MR", source="nifti")
    xray = np.random.default_rng(5).integers(0, 4000, (1, 60, 50)).astype(np.uint16)
    cache_builder.add("xr0", xray, modality="DX", kind="image")
    cache_builder.add("val0", noise_volume(7, (6, 40, 40)), split="val")
    return cache_builder.write()


def _pair(cache: Path, **options) -> tuple[CacheDataModule, CacheDataModule]:
    common = dict(img_size=24, batch_size=6, selection={"min_size": 8}, sampling={"samples_per_epoch": 24},
                  num_workers=0, **options)
    cpu = CacheDataModule(str(cache), loader=LoaderOptions(device_transforms=False), **common)
    dev = CacheDataModule(str(cache), loader=LoaderOptions(device_transforms=True), **common)
    return cpu, dev


def _batches(dm: CacheDataModule, split: str) -> list[dict]:
    dm.setup("fit")
    loader = dm.train_dataloader() if split == "train" else dm.val_dataloader()
    return [dm.on_after_batch_transfer(b, 0) for b in loader]


@pytest.mark.parametrize(
    "options",
    [
        {"slices": 1},
        {"slices": 3, "hflip_prob": 0.5},
        {"slices": 2, "intensity": {"ct_window_mode": "channels"}},
        {"slices": 3, "foreground": {"foreground_fraction": 0.3}, "crop": {"interpolation": "bicubic"}},
    ],
    ids=["2d", "2p5d", "windows-as-channels", "foreground-bicubic"],
)
def test_device_path_matches_cpu_path_on_train_and_val(mixed_cache: Path, options: dict) -> None:
    cpu, dev = _pair(mixed_cache, **options)
    for split in ("train", "val"):
        a, b = _batches(cpu, split), _batches(dev, split)
        assert len(a) == len(b) > 0
        for x, y in zip(a, b, strict=True):
            assert not set(RAW_KEYS) & set(y)
            assert torch.equal(x["index"], y["index"]) and torch.equal(x["series"], y["series"])
            assert torch.equal(x["rejected"], y["rejected"])
            assert x["image"].shape == y["image"].shape == (len(x["index"]), cpu.channels, 24, 24)
            torch.testing.assert_close(y["image"], x["image"], atol=1e-6, rtol=0)


def test_deferred_samples_ship_stored_values_unflipped(mixed_cache: Path) -> None:
    _, dev = _pair(mixed_cache, slices=1, crop=CropOptions(hflip_prob=1.0))
    dev.setup("fit")
    loader = dev.train_dataloader()
    ds = loader.dataset
    assert ds.defer_pixels
    sample = ds[SampleKey(0, 0, 0)]
    assert "image" not in sample and sample["raw"].dtype in (torch.int16, torch.float32, torch.uint16)
    assert sample["flip"] is True and sample["raw_hw"] == tuple(sample["raw"].shape[-2:])
    batch = collate_raw([ds[SampleKey(0, i, i)] for i in range(4)])
    assert batch["raw"].shape[0] == 4 and isinstance(batch["raw_hw"], list)
    assert finish_on_device(batch, dev.transform)["image"].shape == (4, 1, 24, 24)


def test_auto_mode_is_off_without_a_cuda_trainer(mixed_cache: Path) -> None:
    dm = CacheDataModule(str(mixed_cache), img_size=24, batch_size=2, selection={"min_size": 8}, num_workers=0)
    assert dm.loader.device_transforms is None and not dm.pixels_on_device()
    with pytest.raises(ValueError, match="data.loader.device_transforms"):
        CacheDataModule(str(mixed_cache), loader=LoaderOptions(device_transforms="yes"))


def test_fit_trains_on_deferred_batches(mixed_cache: Path, tmp_path: Path) -> None:
    """Through Lightning: the hook finishes every batch before the step sees it."""
    import lightning.pytorch as pl

    from medmae.train import MAEPretrainModule

    dm = CacheDataModule(
        str(mixed_cache),
        img_size=32,
        batch_size=4,
        selection=SelectionOptions(min_size=8),
        sampling=SamplingOptions(samples_per_epoch=8),
        num_workers=0,
        loader=LoaderOptions(device_transforms=True),
    )
    module = MAEPretrainModule(
        variant="mae_vit_tiny_patch16",
        mae={"img_size": 32, "patch_size": 8, "depth": 2, "decoder_embed_dim": 32, "decoder_depth": 1,
             "decoder_num_heads": 2},
        optim={"warmup_steps": 0, "lr": 1e-3},
    )  # fmt: skip
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=1,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 2 and dm.train_dataloader().dataset.defer_pixels
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
