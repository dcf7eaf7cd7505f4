"""Atomic checkpoint files on any filesystem.

Lightning's ``TorchCheckpointIO`` lets fsspec write a temporary file in ``$TMPDIR`` and move it into
place. When ``$TMPDIR`` is another filesystem than the checkpoint folder (a local ``/tmp`` and a network
or scratch file system, the usual cluster setup), that move is a truncate-and-copy: a kill during the
copy leaves a truncated or 0-byte ``last.ckpt`` where the previous good one was.

:class:`AtomicCheckpointIO` writes the temporary file in the checkpoint's own folder, fsyncs it,
renames it over the target (``os.replace``: atomic within one filesystem) and fsyncs the folder. At
any instant the target path holds either the complete old checkpoint or the complete new one. A
temporary file orphaned by a kill is removed by the next save of the same checkpoint. Remote URLs
(``s3://`` ...) keep Lightning's own fsspec path.

:class:`AtomicCheckpoints` is the callback that installs it on the trainer's strategy;
:class:`~medmae.train.MAEPretrainModule` attaches it to every run.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.io import TorchCheckpointIO

log = logging.getLogger(__name__)

TMP_SUFFIX = ".tmp"


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}{TMP_SUFFIX}")


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # some filesystems cannot open or fsync a directory
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def remove_stale_temporaries(path: Path) -> int:
    """Delete temporary files that an interrupted save of ``path`` left in its folder; count them."""
    removed = 0
    for tmp in path.parent.glob(f".{path.name}.*{TMP_SUFFIX}"):
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
            removed += 1
    return removed


def atomic_torch_save(obj: Any, path: str | os.PathLike[str]) -> Path:
    """``torch.save(obj, path)`` through a fsynced temporary file in ``path``'s folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if remove_stale_temporaries(path):
        log.warning("removed a partial checkpoint left by an interrupted save of %s", path.name)
    tmp = _tmp_name(path)
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)
    return path


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local saves are atomic (see the module docstring)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or not isinstance(get_filesystem(path), LocalFileSystem):
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_torch_save(checkpoint, str(path).removeprefix("file://"))


class AtomicCheckpoints(Callback):
    """Installs :class:`AtomicCheckpointIO` unless the strategy was given a custom ``CheckpointIO``."""

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        strategy = trainer.strategy
        if type(strategy.checkpoint_io) is TorchCheckpointIO:
            strategy.checkpoint_io = AtomicCheckpointIO()
