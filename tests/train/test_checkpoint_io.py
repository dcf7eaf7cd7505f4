"""Atomic checkpoints: a SIGKILL while a checkpoint is being written leaves the previous one intact."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import torch

from medmae.train import MAEPretrainModule
from medmae.train.checkpoint_io import AtomicCheckpointIO, atomic_torch_save
from tests.train.conftest import TensorDataModule, smooth_images

REPO = Path(__file__).resolve().parents[2]

#: child: write a ~256 MB checkpoint through the CheckpointIO that medmae training installs
WRITER = """
import sys, torch
from medmae.train.checkpoint_io import AtomicCheckpointIO
AtomicCheckpointIO().save_checkpoint({"marker": "new", "big": torch.ones(64, 1024, 1024)}, sys.argv[1])
"""


def _temporaries(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.name.startswith(".last.ckpt.")]


def test_kill_during_checkpoint_write_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    folder = tmp_path / "checkpoints"
    target = folder / "last.ckpt"
    atomic_torch_save({"marker": "old", "w": torch.arange(4)}, target)

    other_fs_tmp = Path("/dev/shm") if Path("/dev/shm").is_dir() else tmp_path / "tmpdir"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        "TMPDIR": str(other_fs_tmp),  # Lightning's own writer would stage the file there
    }
    child = subprocess.Popen([sys.executable, "-c", WRITER, str(target)], env=env, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    seen: list[Path] = []
    while child.poll() is None and time.monotonic() < deadline:
        seen = [p for p in _temporaries(folder) if p.stat().st_size > 0]
        if seen:
            break
        time.sleep(0.001)
    child.send_signal(signal.SIGKILL)
    assert child.wait() == -signal.SIGKILL, child.stderr.read().decode()[-2000:] if child.stderr else ""
    assert seen, "the writer never showed a temporary file beside the checkpoint"
    assert seen[0].parent == folder  # staged in the checkpoint's own folder, not in $TMPDIR

    old = torch.load(target, weights_only=True)
    assert old["marker"] == "old" and torch.equal(old["w"], torch.arange(4))

    # the next save replaces the checkpoint and sweeps the orphaned temporary file
    atomic_torch_save({"marker": "newer"}, target)
    assert torch.load(target, weights_only=True)["marker"] == "newer"
    assert _temporaries(folder) == []


def test_training_saves_through_the_atomic_writer(tmp_path: Path, tiny_model_kwargs: dict) -> None:
    module = MAEPretrainModule(**tiny_model_kwargs, optim={"warmup_steps": 0})
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=2,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=tmp_path,
        callbacks=[pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)],
    )
    trainer.fit(module, datamodule=TensorDataModule(smooth_images(4), batch_size=2))
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    names = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert "last.ckpt" in names and not [n for n in names if n.startswith(".")]
    assert torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["global_step"] == 2
