"""``medmae demo``: the whole flow on the real sample scans that ship inside pydicom and nibabel.

archive (pydicom's test files + nibabel's test data, messy on purpose: SR, RT, truncated and colour
files sit beside real CT/MR) -> ``data_prep`` cache -> tiny MAE pretraining on CPU -> checkpoint,
TensorBoard log, reconstruction PNG and exported encoder, all under one work directory::

    medmae demo                              # ./medmae_demo, a few minutes on 2 CPU cores
    medmae demo --workdir /tmp/demo --steps 50

The settings are the demo's own (a tiny ViT at 64x64) and match ``configs/pretrain/tiny_cpu.yaml``;
the code path is the one a hospital run uses.
"""

from __future__ import annotations

import argparse
import logging
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import lightning.pytorch as pl
import nibabel
import pydicom
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger

from medmae.data import CacheDataModule
from medmae.export import export_encoder
from medmae.train import MAEPretrainModule, ReconstructionLogger, save_grid_png

#: tiny ViT that learns something visible in a few minutes on 2 cores (same as configs/pretrain/tiny_cpu.yaml)
DEMO_MODEL: dict = {
    "variant": "mae_vit_tiny_patch16",
    "mae": {
        "img_size": 64,
        "patch_size": 8,
        "depth": 4,
        "decoder_embed_dim": 128,
        "decoder_depth": 2,
        "decoder_num_heads": 4,
        "norm_pix_loss": False,  # plain pixels: the reconstruction PNG is easier to read on a tiny model
    },
    "optim": {
        "blr": 1.0e-2,  # lr = blr * 32 / 256 = 1.25e-3: a tiny model on little data takes a high lr
        "warmup_steps": 20,
        "min_lr": 1.0e-5,
    },
}
#: the data side of configs/pretrain/tiny_cpu.yaml (sections as in the config: ``medmae.data.options``)
DEMO_DATA: dict = {
    "img_size": 64,
    "slices": 1,
    "batch_size": 32,
    "selection": {"min_size": 32},
    "sampling": {"samples_per_epoch": 3200},
}


@dataclass(frozen=True)
class DemoOutputs:
    """Where the demo left everything (all inside the work directory)."""

    cache: Path
    logs: Path
    checkpoint: Path
    reconstruction_png: Path
    encoder: Path


def sample_archives() -> list[Path]:
    """The sample scans bundled with the installed pydicom and nibabel packages."""
    roots = [
        Path(pydicom.__file__).parent / "data" / "test_files",
        Path(nibabel.__file__).parent / "tests" / "data",
    ]
    missing = [str(r) for r in roots if not r.is_dir()]
    if missing:
        raise FileNotFoundError(f"sample data not found in the installed packages: {missing}")
    return roots


def run_demo(workdir: Path, steps: int, workers: int, progress: bool = True) -> DemoOutputs:
    """prep -> fit -> export on the bundled samples; returns the output locations."""
    from data_prep import prep_archive

    workdir = Path(workdir).resolve()
    cache = workdir / "cache"
    _say(f"[1/3] data_prep: scanning the sample scans of pydicom and nibabel into {cache}")
    summary = prep_archive(
        sample_archives(), cache, workers=workers, salt_file=workdir / "demo.salt", val_fraction=0.2,
        progress=progress,
    )
    _say(f"      {summary.series_built + summary.series_skipped} series in the cache, "
         f"{sum(summary.rejects.values())} files rejected with a reason (see {cache / 'reject_report.json'})")

    _say(f"[2/3] pretraining a tiny MAE on CPU for {steps} steps")
    pl.seed_everything(0, workers=True, verbose=False)
    data = CacheDataModule(str(cache), num_workers=max(0, workers - 1), seed=0, **DEMO_DATA)
    module = MAEPretrainModule(**DEMO_MODEL, log_images_every_n_steps=max(1, steps // 4))
    logger = TensorBoardLogger(workdir / "runs", name="demo")
    checkpoint = ModelCheckpoint(dirpath=workdir / "checkpoints", filename="mae-{step}", save_last=True)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        precision="32-true",
        max_steps=steps,
        logger=logger,
        callbacks=[checkpoint],
        log_every_n_steps=5,
        enable_progress_bar=progress,
        enable_model_summary=False,
        default_root_dir=workdir,
    )
    started = time.perf_counter()
    trainer.fit(module, datamodule=data)
    _say(f"      done in {time.perf_counter() - started:.0f} s, last train/loss "
         f"{float(trainer.callback_metrics.get('train/loss', float('nan'))):.4f}")

    _say("[3/3] exporting the encoder and the last reconstruction grid")
    recon = next(cb for cb in trainer.callbacks if isinstance(cb, ReconstructionLogger))
    png = save_grid_png(recon.last_grid, workdir / "reconstruction.png", scale=3)  # 64-px tiles are tiny
    encoder = export_encoder(
        module.model, workdir / "encoder", data.preprocessing(), {"global_step": trainer.global_step}
    )
    return DemoOutputs(cache, Path(logger.log_dir), Path(checkpoint.last_model_path), png, encoder)


def _say(message: str) -> None:
    print(message, flush=True)


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="medmae demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("medmae_demo"), help="output directory")
    parser.add_argument("--steps", type=int, default=1000, help="pretraining steps (default 1000)")
    parser.add_argument("--workers", type=int, default=2, help="processes for prep and data loading")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(list(argv))
    if args.steps < 1:
        parser.error("--steps must be >= 1")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    # Lightning 2.6 on torch >= 2.10 warns about a deprecated torch pytree API on every run: not ours
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    out = run_demo(args.workdir, args.steps, max(1, args.workers), progress=not args.quiet)
    _say(
        "\nmedmae demo finished. Everything is in " + str(args.workdir.resolve()) + ":\n"
        f"  cache + manifest      {out.cache}\n"
        f"  TensorBoard log       {out.logs}\n"
        f"  checkpoint            {out.checkpoint}\n"
        f"  reconstruction image  {out.reconstruction_png}\n"
        f"  exported encoder      {out.encoder} (+ encoder.json)\n\n"
        f"Look at training curves and reconstructions with:\n  tensorboard --logdir {out.logs.parent}\n\n"
        f"Fine-tune the encoder on your labelled scans (docs/finetune.md), e.g.:\n"
        f"  medmae finetune-seg --config configs/finetune/seg_tiny_cpu.yaml --model.init medmae:{out.encoder.parent} "
        f"--model.decoder light --model.num_classes K --data.csv cases.csv"
    )
    return 0
