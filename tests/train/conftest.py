"""Small fixed-tensor data for LightningModule tests, and a tiny real cache for `medmae fit` runs."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

TINY_MODEL = {
    "variant": "mae_vit_tiny_patch16",
    "mae": {"img_size": 64, "patch_size": 8, "depth": 4, "decoder_embed_dim": 128, "decoder_depth": 2,
            "decoder_num_heads": 4},
}  # fmt: skip


def with_mae(kwargs: dict, **mae: object) -> dict:
    """``kwargs`` (module arguments) with ``mae`` fields changed."""
    return {**kwargs, "mae": {**kwargs.get("mae", {}), **mae}}


def smooth_images(n: int, channels: int = 1, size: int = 64, seed: int = 0) -> torch.Tensor:
    """Discs on a gradient: structured enough that masked patches are predictable."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    imgs = torch.empty(n, channels, size, size)
    for i in range(n):
        for c in range(channels):
            cx, cy = (torch.rand(2, generator=g) - 0.5).tolist()
            r = 0.2 + 0.5 * torch.rand(1, generator=g).item()
            imgs[i, c] = (((xx - cx) ** 2 + (yy - cy) ** 2) < r**2).float() * 0.8 + 0.1 * xx + 0.05 * torch.sin(6 * yy)
    return imgs


class _Tensors(Dataset):
    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"image": self.images[i]}


class TensorDataModule(pl.LightningDataModule):
    """A fixed set of images as dict batches, with the attributes the module checks."""

    def __init__(self, images: torch.Tensor, batch_size: int) -> None:
        super().__init__()
        self.images = images
        self.batch_size = batch_size

    @property
    def channels(self) -> int:
        return int(self.images.shape[1])

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.images.shape[2]), int(self.images.shape[3])

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_Tensors(self.images), batch_size=self.batch_size, shuffle=False)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(_Tensors(self.images), batch_size=self.batch_size)


@pytest.fixture
def tiny_model_kwargs() -> dict:
    return dict(TINY_MODEL)


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache of four small CT volumes (three train, one val), written through medmae.data.cache: the
    one the old-checkpoint fixtures were made on (tests/fixtures/make_old_mae_checkpoint.py builds it)."""
    from tests.fixtures.make_old_mae_checkpoint import build_cache

    return build_cache(tmp_path_factory.mktemp("tiny_cache") / "cache")
