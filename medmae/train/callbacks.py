"""Training callbacks: throughput and reconstruction images in TensorBoard.

Both are attached by :meth:`MAEPretrainModule.configure_callbacks`, so every run (CLI, demo, tests)
logs them without config boilerplate.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torchvision.utils import make_grid, save_image

from medmae.models import MAEBase
from medmae.models.flops import model_train_flops

#: value shown where patches were masked in the "masked input" panel
MASKED_GRAY = 0.5


#: bf16 dense tensor-core peak TFLOP/s by GPU name fragment (vendor datasheets); used for MFU on CUDA
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0}


def peak_tflops(device_name: str) -> float | None:
    """Datasheet bf16 peak of a GPU named ``device_name``, or None when unknown."""
    for fragment, peak in PEAK_BF16_TFLOPS.items():
        if fragment in device_name:
            return peak
    return None


class ThroughputLogger(Callback):
    """Logs images/s (all ranks together, data loading included), the share of the step spent waiting
    for the loader and, on CUDA, MFU; warns when the loader starves the step; prints a summary at the end.

    Timing is host-side and adds no synchronisation: the loader wait is the time between the end of
    one step and the start of the next, i.e. the host blocked on ``next(dataloader)``.

    Args:
        window: steps averaged for the logged rates.
        warn_wait_fraction: warn (once) when the loader wait exceeds this share of step time.
        warmup_steps: steps ignored at the start (worker start-up, compilation).
        peak_tflops: peak of one device for MFU; default: looked up from the CUDA device name.
    """

    def __init__(
        self,
        window: int = 20,
        warn_wait_fraction: float = 0.1,
        warmup_steps: int = 5,
        peak_tflops: float | None = None,
    ) -> None:
        self._steps: deque[tuple[int, float, float]] = deque(maxlen=window)  # (images, seconds, waited)
        self._last: float | None = None
        self._started: float | None = None
        self.warn_wait_fraction = warn_wait_fraction
        self.warmup_steps = warmup_steps
        self.peak_tflops = peak_tflops
        self.totals = {"images": 0, "seconds": 0.0, "waited": 0.0}
        self.warned = False
        self._flops: float | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        model = getattr(pl_module, "model", None)
        self._flops = model_train_flops(model) if isinstance(model, MAEBase) else None
        if self.peak_tflops is None and pl_module.device.type == "cuda":
            self.peak_tflops = peak_tflops(torch.cuda.get_device_name(pl_module.device))

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last = None  # validation time is not training throughput

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._started = time.perf_counter()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        now = time.perf_counter()
        if self._last is not None and self._started is not None:
            images = int(batch["image"].shape[0]) * trainer.world_size
            step = (images, now - self._last, max(0.0, self._started - self._last))
            self._steps.append(step)
            if trainer.global_step > self.warmup_steps:
                for key, value in zip(("images", "seconds", "waited"), step, strict=True):
                    self.totals[key] += value
        self._last = now
        if not self._steps:
            return
        images = sum(n for n, _, _ in self._steps)
        seconds = max(sum(t for _, t, _ in self._steps), 1e-9)
        waited = sum(w for _, _, w in self._steps)
        rate = images / seconds
        pl_module.log("train/images_per_sec", rate, on_step=True, prog_bar=True)
        pl_module.log("train/data_wait_fraction", waited / seconds, on_step=True)
        mfu = self.mfu(rate, trainer.world_size)
        if mfu is not None:
            pl_module.log("train/mfu", mfu, on_step=True)
        if (
            not self.warned
            and trainer.global_step > self.warmup_steps
            and len(self._steps) == self._steps.maxlen
            and waited / seconds > self.warn_wait_fraction
        ):
            self.warned = True
            rank_zero_warn(starvation_advice(waited / seconds, trainer))

    def mfu(self, images_per_sec: float, world_size: int) -> float | None:
        """Model FLOPs utilisation per device, when the FLOPs and the device peak are known."""
        if self._flops is None or not self.peak_tflops:
            return None
        return self._flops * images_per_sec / (world_size * self.peak_tflops * 1e12)

    def summary(self) -> str | None:
        """One line over the run after warm-up: images/s, loader wait share, MFU where known."""
        if self.totals["seconds"] <= 0:
            return None
        rate = self.totals["images"] / self.totals["seconds"]
        wait = self.totals["waited"] / self.totals["seconds"]
        line = f"throughput: {rate:.1f} images/s, loader wait {100 * wait:.0f}%"
        if self._flops is not None:
            line += f", {self._flops / 1e9:.2f} GFLOP/image (analytic)"
        return line

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        line = self.summary()
        if line is None:
            return
        rate = self.totals["images"] / self.totals["seconds"]
        mfu = self.mfu(rate, trainer.world_size)
        if mfu is not None:
            line += f", MFU {100 * mfu:.1f}% of {self.peak_tflops:g} TFLOP/s per device"
        rank_zero_info(line)


def starvation_advice(fraction: float, trainer: pl.Trainer) -> str:
    """The warning text: how long the step waited, and what to change."""
    dm = getattr(trainer, "datamodule", None)
    workers = getattr(dm, "num_workers", None)
    return (
        f"the training step waits on the data loader {100 * fraction:.0f}% of the time: raise data.num_workers"
        + (f" (now {workers})" if workers is not None else "")
        + ", keep the cache on local disk (not a network file system), and on CUDA use the GPU data path"
        " (see docs/training.md, Throughput)"
    )


class ReconstructionLogger(Callback):
    """Every ``every_n_steps`` optimizer steps (and at the end), log a reconstruction grid.

    Each row is one sample: original | masked input | reconstruction | reconstruction with the
    visible patches pasted back. A title strip names the panels (the last one shows ground truth
    where patches were visible, so nobody reads it as the model's own output), and a text legend
    says which input channel is shown (the centre slice of a 2.5D stack; the first window in
    window-as-channel mode). Norm-pix is undone. The last grid stays in :attr:`last_grid`
    (3, H, W) in [0, 1] so a caller can save it as a PNG.
    """

    def __init__(self, every_n_steps: int = 500, num_images: int = 4, seed: int = 1234) -> None:
        if every_n_steps < 0 or num_images < 1:
            raise ValueError(f"every_n_steps must be >= 0 and num_images >= 1 (got {every_n_steps}, {num_images})")
        self.every_n_steps = every_n_steps
        self.num_images = num_images
        self.seed = seed
        self.last_grid: torch.Tensor | None = None
        self.last_view: ChannelView | None = None
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
        model: MAEBase = pl_module.model
        view = channel_view(_data_record(trainer), model.in_chans)
        generator = torch.Generator(device=self._batch.device).manual_seed(self.seed)
        was_training = model.training
        model.eval()
        with torch.no_grad():
            grid = reconstruction_grid(model, self._batch.float(), generator, view)
        model.train(was_training)
        self.last_grid = grid.cpu()
        self.last_view = view
        self._logged_step = trainer.global_step
        for logger in trainer.loggers:
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_image"):
                experiment.add_image("train/reconstruction", self.last_grid, trainer.global_step)
            if hasattr(experiment, "add_text"):
                legend = grid_legend(view, spatial_dims=self._batch.ndim - 2)
                experiment.add_text("train/reconstruction_legend", legend, trainer.global_step)


def _data_record(trainer: pl.Trainer) -> dict[str, Any] | None:
    """The datamodule's preprocessing record, when the run has one (it says how channels are laid out)."""
    dm = getattr(trainer, "datamodule", None)
    if dm is None or not hasattr(dm, "preprocessing"):
        return None
    try:
        record = dm.preprocessing()
    except Exception:  # a custom datamodule's record must never stop training for a picture
        return None
    return record if isinstance(record, dict) else None


@dataclass(frozen=True)
class ChannelView:
    """Which input channel the grid shows, and the words that say so."""

    channel: int
    note: str


def channel_view(record: Mapping[str, Any] | None, in_chans: int) -> ChannelView:
    """Pick the channel to show: the centre slice (offset 0) of the first window group.

    Channels are window-major (``[window0: slices..., window1: slices...]``) and slices sit at
    offsets ``-(k-1)//2 .. k//2``, so the centre slice is index ``(k-1)//2`` also for even ``k``.
    Without a data record every channel is taken to be a slice.
    """
    slices = in_chans
    windows: list[Any] = []
    if record is not None:
        default = 1 if record.get("spatial_dims") == 3 else in_chans  # volumes: channels are windows only
        slices = int(record.get("slices", default) or default)
        ct = record.get("intensity", {}).get("ct", {}) if isinstance(record.get("intensity"), Mapping) else {}
        if ct.get("mode") == "channels":
            windows = list(ct.get("windows_level_width") or [])
    if slices < 1 or in_chans % slices:
        slices = in_chans
    centre = (slices - 1) // 2
    parts = [f"channel {centre} of {in_chans}"]
    if slices > 1:
        parts.append(f"centre slice of {slices} (offset 0)")
    if len(windows) > 1 and in_chans == slices * len(windows):
        level, width = windows[0]
        parts.append(f"CT window 1 of {len(windows)} (level {level:g} / width {width:g} HU; other series: percentiles)")
    return ChannelView(centre, "; ".join(parts))


#: panel titles drawn above the columns; the last says that visible patches are ground truth
PANEL_TITLES = ("original", "masked", "output", "output+GT")


def grid_legend(view: ChannelView, spatial_dims: int = 2) -> str:
    """Markdown legend logged beside the grid in TensorBoard."""
    rows = (
        "Rows: for each sample its three orthogonal centre planes, axial (anterior up, patient right "
        "left), coronal and sagittal (superior up). Each sample is scaled to its original volume's min..max."
        if spatial_dims == 3
        else "Each row is scaled to its original's min..max."
    )
    return (
        f"Shown: {view.note}. Columns: **original** input | **masked** input (gray = masked patches) | "
        "**output**: the model's reconstruction of every patch | **output+GT**: the reconstruction on "
        f"masked patches with the *ground-truth* visible patches pasted in (not the model's own output). {rows}"
    )


def centre_planes(volume: torch.Tensor) -> list[torch.Tensor]:
    """The axial, coronal and sagittal centre planes of ``(B, Z, Y, X)`` volumes, superior up.

    Axial ``(Y, X)``; coronal ``(Z, X)`` and sagittal ``(Z, Y)`` with Z reversed so the head is up
    (the cache's plane orientation, ``medmae.data.index``).
    """
    z, y, x = volume.shape[-3:]
    return [volume[:, z // 2], volume[:, :, y // 2].flip(1), volume[..., x // 2].flip(1)]


def _pad_to(tile: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Pad ``(B, h, w)`` at the bottom/right to ``(B, height, width)`` with white."""
    return torch.nn.functional.pad(tile, (0, width - tile.shape[-1], 0, height - tile.shape[-2]), value=1.0)


def reconstruction_grid(
    model: MAEBase,
    imgs: torch.Tensor,
    generator: torch.Generator | None = None,
    view: ChannelView | None = None,
) -> torch.Tensor:
    """(3, H', W') image in [0, 1]: a title strip, then a row per sample (2D) or per sample and
    centre plane (3D: axial, coronal, sagittal), each with four panels."""
    out = model(imgs, generator=generator)
    recon = model.pixels_from_prediction(imgs, out.pred)
    c = model.in_chans
    per_patch = model.decoder_pred.out_features  # patch voxels x channels, 2D or 3D
    mask = model.unpatchify(out.mask.unsqueeze(-1).expand(-1, -1, per_patch).to(imgs.dtype))
    channel = (view or channel_view(None, c)).channel
    orig, recon, mask = imgs[:, channel], recon[:, channel], mask[:, channel]
    dims = tuple(range(1, orig.ndim))
    shape = (-1,) + (1,) * (orig.ndim - 1)
    lo = orig.amin(dim=dims).view(shape)
    span = (orig.amax(dim=dims).view(shape) - lo).clamp_min(1e-6)

    def show(x: torch.Tensor) -> torch.Tensor:
        return ((x - lo) / span).clamp(0.0, 1.0)

    panels = [
        show(orig),
        show(orig) * (1 - mask) + MASKED_GRAY * mask,
        show(recon),
        show(orig * (1 - mask) + recon * mask),
    ]
    if orig.ndim == 4:  # volumes: each panel becomes its three centre planes, padded to one tile size
        planes = [centre_planes(p) for p in panels]  # [panel][plane] (B, h, w)
        height = max(t.shape[-2] for t in planes[0])
        width = max(t.shape[-1] for t in planes[0])
        rows = [torch.stack([_pad_to(planes[k][j], height, width) for k in range(4)], 1) for j in range(3)]
        tiles = torch.stack(rows, 1).reshape(-1, 1, height, width)  # sample, plane, panel
    else:
        width = orig.shape[-1]
        tiles = torch.stack(panels, dim=1).reshape(-1, 1, *orig.shape[-2:])  # sample-major: row per sample
    body = make_grid(tiles, nrow=len(panels), padding=2, pad_value=1.0)
    return torch.cat([title_strip(width, PANEL_TITLES), body], dim=1)


#: height in pixels of the title strip above the grid
TITLE_HEIGHT = 12


def title_strip(panel_width: int, titles: Sequence[str], padding: int = 2) -> torch.Tensor:
    """(3, TITLE_HEIGHT, W) white strip with each title left-aligned over its panel (clipped to it)."""
    from PIL import Image, ImageDraw, ImageFont

    width = len(titles) * (panel_width + padding) + padding
    strip = Image.new("L", (width, TITLE_HEIGHT), 255)
    font = ImageFont.load_default()
    for i, title in enumerate(titles):
        x = padding + i * (panel_width + padding)
        cell = Image.new("L", (panel_width, TITLE_HEIGHT), 255)
        ImageDraw.Draw(cell).text((1, 0), title, fill=0, font=font)
        strip.paste(cell, (x, 0))
    gray = torch.frombuffer(bytearray(strip.tobytes()), dtype=torch.uint8).reshape(TITLE_HEIGHT, width)
    return (gray.float() / 255.0).expand(3, -1, -1).clone()


def save_grid_png(grid: torch.Tensor, path: Path, scale: int = 1) -> Path:
    """Write a grid from :func:`reconstruction_grid` as a PNG, enlarged ``scale`` times (nearest)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if scale > 1:
        grid = torch.nn.functional.interpolate(grid[None], scale_factor=scale, mode="nearest")[0]
    save_image(grid, path)
    return path
