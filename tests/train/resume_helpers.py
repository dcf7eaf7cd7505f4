"""Callbacks for the kill-and-resume tests, loaded by ``medmae fit`` in a subprocess from a YAML config.

``StepLog`` appends one line per optimizer step (global step, the exact loss as a float hex, and the
batch's sampler epoch and draws) and fsyncs it, so the lines survive a SIGKILL. ``KillAt`` sends
SIGKILL to its own process at a chosen hook: nothing after it runs, as when a node dies.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback


class StepLog(Callback):
    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        record = {
            "step": trainer.global_step,
            "loss": float(outputs["loss"]).hex(),
            "epoch": int(batch["epoch"][0]) if "epoch" in batch else None,
            "draws": batch["index"].tolist() if "index" in batch else None,
        }
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())


class KillAt(Callback):
    """SIGKILL this process at ``hook``: ``train_batch_end`` after global step ``step``,
    ``train_epoch_start`` of epoch ``epoch`` (the previous epoch's end checkpoint is written by then),
    or ``validation_batch_end`` of the validation that follows global step ``step``."""

    def __init__(self, hook: str, step: int = -1, epoch: int = -1) -> None:
        self.hook, self.step, self.epoch = hook, step, epoch

    @staticmethod
    def _die() -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if self.hook == "train_batch_end" and trainer.global_step == self.step:
            self._die()

    def on_train_epoch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if self.hook == "train_epoch_start" and trainer.fit_loop.epoch_progress.current.processed == self.epoch:
            self._die()

    def on_validation_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if self.hook == "validation_batch_end" and not trainer.sanity_checking and trainer.global_step == self.step:
            self._die()
