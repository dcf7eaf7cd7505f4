"""data.augment: rotation, zoom, bias field and gamma of 2D training batches (medmae/data/augment.py)."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from medmae.data import AugmentOptions, CacheDataModule, PlaneAugment, SamplingOptions, SelectionOptions
from medmae.data.augment import _bias_field, _rotate_zoom
from medmae.data.stream import STEP_KEY
from medmae.data.volume import VolumeOptions

SHIPPED = AugmentOptions(rotate_deg=15, scale=(0.87, 1.15), gamma=(0.71, 1.4), bias_field=0.05)


def _square(size: int = 32, side: int = 8) -> torch.Tensor:
    image = torch.zeros(1, 1, size, size)
    lo = (size - side) // 2
    image[..., lo : lo + side, lo : lo + side] = 1.0
    return image


def test_off_by_default_and_an_inactive_augment_returns_the_batch_itself() -> None:
    assert not AugmentOptions().active and not PlaneAugment(AugmentOptions()).active
    images = torch.rand(2, 1, 16, 16)
    assert PlaneAugment(AugmentOptions())(images, torch.Generator().manual_seed(0)) is images
    for one in ({"rotate_deg": 1}, {"scale": (1, 1.1)}, {"gamma": (0.9, 1)}, {"bias_field": 0.01}):
        assert AugmentOptions(**one).active, one


@pytest.mark.parametrize(
    ("field", "value"),
    [("rotate_deg", -1), ("rotate_deg", 181), ("scale", (0, 1)), ("scale", (1.2, 1.1)), ("gamma", "x"),
     ("gamma", (0.5, float("inf"))), ("bias_field", 1.5), ("bias_field", True)],
)  # fmt: skip
def test_bad_values_are_one_line_naming_the_key(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=rf"^data\.augment\.{field}") as caught:
        AugmentOptions(**{field: value})
    assert "\n" not in str(caught.value)


def test_a_quarter_turn_is_rot90_and_a_zoom_of_two_doubles_the_side() -> None:
    image = torch.zeros(1, 1, 16, 16)
    image[0, 0, 2:5, 3:11] = torch.arange(24, dtype=torch.float32).view(3, 8) / 24  # not symmetric
    turned = _rotate_zoom(image, torch.tensor([math.pi / 2], dtype=torch.float64), torch.ones(1, dtype=torch.float64))
    assert torch.allclose(turned, torch.rot90(image, k=1, dims=(2, 3)), atol=1e-5)
    still, double = torch.zeros(1, dtype=torch.float64), torch.full((1,), 2.0, dtype=torch.float64)
    zoomed = _rotate_zoom(_square(32, 8), still, double)
    assert float(zoomed.sum()) == pytest.approx(4 * 64, rel=0.02)  # side 8 -> 16: four times the area
    assert float(zoomed[0, 0, 16, 16]) == pytest.approx(1.0)  # the centre stays put


def test_the_bias_field_is_smooth_bounded_and_one_for_zero_coefficients() -> None:
    assert torch.equal(_bias_field(torch.zeros(1, 5, dtype=torch.float64), (8, 12)), torch.ones(1, 1, 8, 12))
    field = _bias_field(torch.full((1, 5), 0.05, dtype=torch.float64), (32, 32))
    assert field.shape == (1, 1, 32, 32)
    assert math.exp(-0.05 * 5) <= float(field.min()) and float(field.max()) <= math.exp(0.05 * 5)
    assert float((field[..., 1:, :] - field[..., :-1, :]).abs().max()) < 0.02  # no edges: smooth shading


def test_gamma_and_clipping_keep_zero_at_zero_and_stay_in_the_unit_range() -> None:
    aug = PlaneAugment(AugmentOptions(gamma=(2.0, 2.0)))
    flat = torch.full((3, 1, 8, 8), 0.5)
    assert torch.allclose(aug(flat, torch.Generator().manual_seed(1)), torch.full_like(flat, 0.25))
    images = torch.rand(6, 2, 24, 20)
    images[:, :, :4] = 0.0
    out = PlaneAugment(SHIPPED)(images, torch.Generator().manual_seed(2))
    assert out.shape == images.shape and out.dtype == images.dtype
    assert 0.0 <= float(out.min()) and float(out.max()) <= 1.0
    assert not torch.allclose(out, images) and bool(out.isfinite().all())
    twins = images[:, :1].repeat(1, 2, 1, 1)  # the channels of a sample (slices, windows) move together
    moved = PlaneAugment(SHIPPED)(twins, torch.Generator().manual_seed(3))
    assert torch.equal(moved[:, 0], moved[:, 1])


def test_draws_are_a_pure_function_of_seed_rank_epoch_and_batch() -> None:
    aug, images = PlaneAugment(SHIPPED), torch.rand(4, 1, 24, 24)
    first = aug(images, aug.generator(seed=0, rank=0, epoch=2, number=5))
    assert torch.equal(first, aug(images, aug.generator(seed=0, rank=0, epoch=2, number=5)))
    for other in ((1, 0, 2, 5), (0, 1, 2, 5), (0, 0, 3, 5), (0, 0, 2, 6)):
        assert not torch.allclose(first, aug(images, aug.generator(*other))), other
    # each image of the batch gets its own draw
    same = images[:1].expand(4, -1, -1, -1).contiguous()
    out = aug(same, aug.generator(0, 0, 0, 0))
    assert not torch.allclose(out[0], out[1])


def _module(cache: Path, augment: AugmentOptions) -> CacheDataModule:
    dm = CacheDataModule(
        str(cache), img_size=24, batch_size=4, num_workers=0, selection=SelectionOptions(min_size=8),
        sampling=SamplingOptions(samples_per_epoch=8), augment=augment,
    )  # fmt: skip
    dm.setup("fit")
    return dm


def test_the_datamodule_augments_training_batches_only_and_reproducibly(noise_cache: Callable[[], Path]) -> None:
    cache = noise_cache()
    plain, augmented = _module(cache, AugmentOptions()), _module(cache, SHIPPED)
    batch = next(iter(plain.train_dataloader()))
    again = next(iter(augmented.train_dataloader()))
    assert torch.equal(batch["image"], again["image"])  # the loaders themselves are untouched
    stamped = {**batch, STEP_KEY: (0, 0)}
    out = augmented.on_after_batch_transfer(dict(stamped), 0)["image"]
    assert not torch.allclose(out, batch["image"])
    assert torch.equal(out, augmented.on_after_batch_transfer(dict(stamped), 0)["image"])  # resume: same draws
    assert torch.equal(plain.on_after_batch_transfer(dict(stamped), 0)["image"], batch["image"])
    val = next(iter(augmented.val_dataloader()))  # validation batches carry no stream position
    assert torch.equal(augmented.on_after_batch_transfer(dict(val), 0)["image"], val["image"])
    assert "augment" not in plain.preprocessing()
    assert augmented.preprocessing()["augment"]["rotate_deg"] == 15.0


def test_a_fit_sees_augmented_batches(noise_cache: Callable[[], Path]) -> None:
    cache = noise_cache()
    seen: list[torch.Tensor] = []

    class Probe(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(1, 1)

        def training_step(self, batch, batch_idx):
            seen.append(batch["image"].clone())
            return self.layer(batch["image"].mean(dim=(1, 2, 3))[:, None]).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    def run(augment: AugmentOptions) -> list[torch.Tensor]:
        seen.clear()
        trainer = pl.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, limit_val_batches=0, accelerator="cpu")  # fmt: skip
        trainer.fit(Probe(), datamodule=_module(cache, augment))
        return list(seen)

    plain, augmented = run(AugmentOptions()), run(SHIPPED)
    assert len(plain) == len(augmented) == 2
    assert all(not torch.allclose(a, b) for a, b in zip(plain, augmented, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(augmented, run(SHIPPED), strict=True))


def test_3d_refuses_it_in_one_line(noise_cache: Callable[[], Path]) -> None:
    with pytest.raises(ValueError, match=r"^data\.augment is 2D only"):
        CacheDataModule(str(noise_cache()), volume=VolumeOptions(size=(8, 8, 8)), augment=SHIPPED)
