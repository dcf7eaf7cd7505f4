"""Is the model fed? End-to-end ``fit`` images/s from a cache divided by model-step-only images/s.

Both runs are ``lightning.Trainer.fit`` of the same ``MAEPretrainModule`` on the same machine, device,
precision and batch; they differ only in where batches come from:

* ``step only``: one pre-made batch in memory, handed over again and again (no loading at all);
* ``fit``: the real ``CacheDataModule`` (memory-mapped cache, random-resized crop, resize, CT
  window or percentiles, flip) with ``--workers`` loader processes.

``fit / step only`` is the **starvation ratio**: 1.0 means the loader keeps up and the step alone sets
the pace; 0.5 means the accelerator idles half the time. Timing starts after ``--warmup`` steps
(worker start-up, compilation) and synchronises the device at both ends.

The data are the synthetic CT archive of ``benchmarks/dataloader.py`` (512² int16 slices in HU),
built once under ``--work`` and put through ``data_prep.prep_archive``; ``--cache`` uses an existing
cache instead. Example::

    python benchmarks/fit_throughput.py --model small --batch 16 --workers 2 --slices 1 3 --threads 2
    python benchmarks/fit_throughput.py --device cuda --precision bf16-mixed --model base --batch 256 --workers 12
    python benchmarks/fit_throughput.py ... --pixels workers    # the CPU data path on CUDA, for comparison
"""

from __future__ import annotations

import argparse
import logging
import platform
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, IterableDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dataloader import build_cache, write_archive  # noqa: E402  (the same synthetic archive)


class _SameBatch(IterableDataset):
    """Yields one pre-made batch forever: the loader costs nothing."""

    def __init__(self, batch: dict[str, torch.Tensor]) -> None:
        self.batch = batch

    def __iter__(self):
        while True:
            yield self.batch


class StepOnlyData(pl.LightningDataModule):
    """Random images of the data's shape, already batched, never reloaded."""

    def __init__(self, batch: int, channels: int, size: int) -> None:
        super().__init__()
        self.batch_size, self.channels, self.image_size = batch, channels, (size, size)
        self._batch = {"image": torch.rand(batch, channels, size, size)}

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_SameBatch(self._batch), batch_size=None, pin_memory=torch.cuda.is_available())


class Timer(pl.Callback):
    """Wall time of the steps after ``warmup``, the device synchronised at both ends."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.start: float | None = None
        self.seconds = 0.0
        self.steps = 0

    def _sync(self, pl_module: pl.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.warmup:
            self._sync(pl_module)
            self.start = time.perf_counter()
            self.steps = -trainer.global_step

    def on_train_end(self, trainer, pl_module) -> None:
        self._sync(pl_module)
        if self.start is not None:
            self.seconds = time.perf_counter() - self.start
            self.steps += trainer.global_step


def run(a: argparse.Namespace, data: pl.LightningDataModule, channels: int) -> float:
    """images/s of ``--steps`` timed steps of a fresh module on ``data``."""
    from medmae.train import MAEPretrainModule
    from medmae.train.options import MAEOptions, OptimOptions

    torch.manual_seed(0)
    module = MAEPretrainModule(
        variant=f"mae_vit_{a.model}_patch16",
        mae=MAEOptions(
            in_chans=channels,
            img_size=a.img_size,
            decoder_embed_dim=a.decoder_dim,
            decoder_depth=a.decoder_depth,
            decoder_num_heads=a.decoder_heads,
        ),
        optim=OptimOptions(warmup_steps=0),
        log_images_every_n_steps=0,
        compile=a.compile,
    )
    timer = Timer(a.warmup)
    trainer = pl.Trainer(
        accelerator="gpu" if a.device == "cuda" else "cpu",
        devices=1,
        precision=a.precision,
        max_steps=a.warmup + a.steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[timer],
    )
    trainer.fit(module, datamodule=data)
    return timer.steps * a.batch / max(timer.seconds, 1e-9)


def cache_data(a: argparse.Namespace, cache: Path, slices: int) -> pl.LightningDataModule:
    from medmae.data import CacheDataModule, LoaderOptions, SamplingOptions

    return CacheDataModule(
        str(cache),
        img_size=a.img_size,
        slices=slices,
        batch_size=a.batch,
        num_workers=a.workers,
        sampling=SamplingOptions(samples_per_epoch=a.batch * (a.warmup + a.steps + 2)),
        loader=LoaderOptions(
            verify_on_setup=False,
            device_transforms={"auto": None, "workers": False, "device": True}[a.pixels],
        ),
    )


def machine(a: argparse.Namespace) -> str:
    cpu = platform.processor() or platform.machine()
    dev = torch.cuda.get_device_name() if a.device == "cuda" else f"{torch.get_num_threads()} torch threads"
    return f"{cpu}, {dev}, torch {torch.__version__}, python {platform.python_version()}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/medmae_bench"), help="synthetic archive + cache")
    ap.add_argument("--cache", type=Path, default=None, help="an existing medmae cache instead")
    ap.add_argument("--series", type=int, default=4)
    ap.add_argument("--slices-per-series", type=int, default=64)
    ap.add_argument("--model", choices=("tiny", "small", "base", "large"), default="small")
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--decoder-dim", type=int, default=512)
    ap.add_argument("--decoder-depth", type=int, default=8)
    ap.add_argument("--decoder-heads", type=int, default=16)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--slices", type=int, nargs="+", default=[1, 3], help="slices per sample (1 = 2D)")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per run")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch threads of the training process")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--precision", default="32-true", help="Lightning precision, e.g. bf16-mixed")
    ap.add_argument("--compile", action="store_true", help="model.compile: true")
    ap.add_argument(
        "--pixels",
        choices=("auto", "workers", "device"),
        default="auto",
        help="where resize/intensity run: data.device_transforms null (device on CUDA) / false / true",
    )
    a = ap.parse_args(argv)
    if a.steps < 1 or a.warmup < 1:
        ap.error("--steps and --warmup must be >= 1")
    if a.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but torch.cuda.is_available() is False")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # no per-run banners in the report
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.cache is not None:
        cache, how = a.cache, "existing cache"
    else:
        write_archive(a.work / "archive", a.series, a.slices_per_series, 512)
        cache = a.work / "cache"
        how = build_cache(a.work / "archive", cache)
    print(f"machine: {machine(a)}")
    print(
        f"config : ViT-{a.model[0].upper()}/16 MAE, {a.img_size}^2, batch {a.batch}, {a.device} {a.precision}, "
        f"compile={a.compile}, pixels on {a.pixels}, {a.workers} loader workers, "
        f"{a.warmup} warmup + {a.steps} timed steps; data: {how}"
    )
    rows = []
    for slices in a.slices:
        step_only = run(a, StepOnlyData(a.batch, slices, a.img_size), slices)
        fit = run(a, cache_data(a, cache, slices), slices)
        rows.append((slices, step_only, fit))
        print(f"  slices {slices}: step only {step_only:.2f} img/s, fit {fit:.2f} img/s", flush=True)
    print()
    print("| input | loader workers | step only (img/s) | fit from cache (img/s) | starvation ratio |")
    print("|---|---:|---:|---:|---:|")
    for slices, step_only, fit in rows:
        kind = "2D" if slices == 1 else f"2.5D ({slices} slices)"
        print(f"| {kind} | {a.workers} | {step_only:.2f} | {fit:.2f} | {fit / step_only:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
