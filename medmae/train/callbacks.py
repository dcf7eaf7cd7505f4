"""Training callbacks: throughput and reconstruction images in TensorBoard.

Both are attached by :meth:`MAEPretrainModule.configure_callbacks`, so every run (CLI, demo, tests)
logs them without config boilerplate.
"""

from __future__ import annotations

import time
from collections import deque
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torchvision.utils import make_grid, save_image

from medmae.models import MaskedAutoencoder

#: value shown where patches were masked in the "masked input" panel
MASKED_GRAY = 0.5


class ThroughputLogger(Callback):
    """Logs ``train/images_per_sec`` (all ranks together, data loading included) over recent steps."""

    def __init__(self, window: int = 20) -> None:
        self._steps: deque[tuple[int, float]] = deque(maxlen=window)
        self._last: float | None = None

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last = None  # validation time is not training throughput

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        now = time.perf_counter()
        if self._last is not None:
            self._steps.append((int(batch["image"].shape[0]) * trainer.world_size, now - self._last))
        self._last = now
        if self._steps:
            images = sum(n for n, _ in self._steps)
            seconds = sum(t for _, t in self._steps)
            pl_module.log("train/images_per_sec", images / max(seconds, 1e-9), on_step=True, prog_bar=True)


class ReconstructionLogger(Callback):
    """Every ``every_n_steps`` optimizer steps (and at the end), log a reconstruction grid.

    Each row is one sample: original | masked input | reconstruction | reconstruction with the
    visible patches pasted back. Norm-pix is undone, and for 2.5D input the centre slice is shown.
    The last grid stays in :attr:`last_grid` (3, H, W) in [0, 1] so a caller can save it as a PNG.
    """

    def __init__(self, every_n_steps: int = 500, num_images: int = 4, seed: int = 1234) -> None:
        if every_n_steps < 0 or num_images < 1:
            raise ValueError(f"every_n_steps must be >= 0 and num_images >= 1 (got {every_n_steps}, {num_images})")
        self.every_n_steps = every_n_steps
        self.num_images = num_images
        self.seed = seed
        self.last_grid: torch.Tensor | None = None
        self._batch: torch.Tensor | None = None
        self._logged_step = -1

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not trainer.is_global_zero:
            return
        self._batch = batch["image"][: self.num_images].detach()
        step = trainer.global_step
        if self.every_n_steps and step % self.every_n_steps == 0 and step != self._logged_step:
            self._render(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero and self._batch is not None and trainer.global_step != self._logged_step:
            self._render(trainer, pl_module)

    def _render(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        model: MaskedAutoencoder = pl_module.model
        generator = torch.Generator(device=self._batch.device).manual_seed(self.seed)
        was_training = model.training
        model.eval()
        with torch.no_grad():
            grid = reconstruction_grid(model, self._batch.float(), generator)
        model.train(was_training)
        self.last_grid = grid.cpu()
        self._logged_step = trainer.global_step
        for logger in trainer.loggers:
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_image"):
                experiment.add_image("train/reconstruction", self.last_grid, trainer.global_step)


def reconstruction_grid(
    model: MaskedAutoencoder, imgs: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """(3, H', W') image in [0, 1]: a row per sample, four panels per row (see ReconstructionLogger)."""
    out = model(imgs, generator=generator)
    recon = model.pixels_from_prediction(imgs, out.pred)
    p, c = model.patch_size, model.in_chans
    mask = model.unpatchify(out.mask.unsqueeze(-1).expand(-1, -1, p * p * c).to(imgs.dtype))
    centre = c // 2
    orig, recon, mask = imgs[:, centre], recon[:, centre], mask[:, centre]
    lo = orig.amin(dim=(1, 2), keepdim=True)
    span = (orig.amax(dim=(1, 2), keepdim=True) - lo).clamp_min(1e-6)

    def show(x: torch.Tensor) -> torch.Tensor:
        return ((x - lo) / span).clamp(0.0, 1.0)

    panels = [
        show(orig),
        show(orig) * (1 - mask) + MASKED_GRAY * mask,
        show(recon),
        show(orig * (1 - mask) + recon * mask),
    ]
    tiles = torch.stack(panels, dim=1).reshape(-1, 1, *orig.shape[-2:])  # sample-major: row per sample
    return make_grid(tiles, nrow=len(panels), padding=2, pad_value=1.0)


def save_grid_png(grid: torch.Tensor, path: Path, scale: int = 1) -> Path:
    """Write a grid from :func:`reconstruction_grid` as a PNG, enlarged ``scale`` times (nearest)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if scale > 1:
        grid = torch.nn.functional.interpolate(grid[None], scale_factor=scale, mode="nearest")[0]
    save_image(grid, path)
    return path
