"""``medmae fit`` / ``medmae validate``: LightningCLI over MAEPretrainModule + CacheDataModule.

Launch::

    medmae fit --config configs/pretrain/vit_base_gray_224.yaml
    medmae fit --config configs/pretrain/tiny_cpu.yaml --data.cache_dir /data/cache --trainer.max_steps 100
    # several GPUs / nodes: set trainer.devices / trainer.num_nodes (strategy ddp); under SLURM use srun
    medmae fit --config configs/pretrain/vit_base_gray_224.yaml --ckpt_path last   # resume the newest run

Configuration mistakes (an unknown key, an image size that is not a multiple of the patch, a model
whose ``in_chans`` differs from the channels the data yields, a cache that is missing or yields no
training slice, ``trainer.max_steps < -1``) stop before training with a one-line message that names
the field or file.

``--ckpt_path last`` resumes from the newest ``last*.ckpt`` of this run's checkpoint folders (the
``ModelCheckpoint`` ``dirpath``, or ``<logger save_dir>/<name>/version_*/checkpoints``) and reuses that
logger version, so TensorBoard curves and new checkpoints continue in the same folder. Without any
checkpoint it says so in one line and starts from step 0 (so the same command starts and resumes).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from medmae.data import CacheDataModule
from medmae.train.module import MAEPretrainModule

#: errors a data or model check raises that are the user's configuration, not a bug
CONFIG_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, PermissionError, RuntimeError)


class MedMAECLI(LightningCLI):
    """LightningCLI that turns configuration errors into a one-line error before training."""

    def fail(self, message: str) -> NoReturn:
        """Print ``medmae <subcommand>: error: <message>`` on one line and exit with status 2."""
        sys.stderr.write(f"medmae {self.subcommand or ''}: error: {' '.join(str(message).split())}\n")
        raise SystemExit(2)

    def before_instantiate_classes(self) -> None:
        trainer = (self.config[self.subcommand] if self.subcommand else self.config).get("trainer")
        max_steps = trainer.get("max_steps") if trainer is not None else None
        if isinstance(max_steps, int) and max_steps < -1:
            self.fail(f"trainer.max_steps must be -1 (no limit) or >= 0, got {max_steps}")

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except (ValueError, MisconfigurationException) as e:
            self.fail(f"invalid configuration: {e}")

    def before_fit(self) -> None:
        self._check_trainer_limits()
        self._check_compatible()
        self._check_data(stage="fit")
        self._resolve_last_checkpoint()

    def before_validate(self) -> None:
        self._check_compatible()
        self._check_data(stage="validate")

    def _check_compatible(self) -> None:
        try:
            self.model.check_data_compatible(self.datamodule)
        except ValueError as e:
            self.fail(f"invalid configuration: {e}")

    def _check_trainer_limits(self) -> None:
        trainer = self.trainer
        if trainer.max_steps < -1:
            self.fail(f"trainer.max_steps must be -1 (no limit) or >= 0, got {trainer.max_steps}")
        max_epochs = trainer.fit_loop.max_epochs
        if max_epochs is not None and max_epochs < -1:
            self.fail(f"trainer.max_epochs must be -1 (no limit), null or >= 0, got {max_epochs}")

    def _check_data(self, stage: str) -> None:
        """Read the cache's manifest and build the index now, so a bad cache stops before training."""
        dm = self.datamodule
        if not isinstance(dm, CacheDataModule):
            return
        try:
            dm.setup(stage)
            if stage == "fit":
                dm.check_batches_per_epoch(self.trainer.world_size)
        except CONFIG_ERRORS as e:
            self.fail(str(e))

    def _resolve_last_checkpoint(self) -> None:
        config = self.config_init[self.subcommand]
        if config.get("ckpt_path") != "last":
            return
        path = find_last_checkpoint(self.trainer)
        if path is None:
            sys.stderr.write("medmae fit: no checkpoint of this run found (--ckpt_path last): starting at step 0\n")
            config["ckpt_path"] = None
            return
        _continue_logger_version(self.trainer, path)
        config["ckpt_path"] = str(path)


def _checkpoint_dirs(trainer: Any) -> list[Path]:
    """Folders where this run's ``last.ckpt`` can be: explicit ModelCheckpoint dirpaths, or every
    logger version's ``checkpoints`` folder."""
    dirs = [Path(cb.dirpath) for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint) and cb.dirpath]
    if len(dirs) < len(trainer.checkpoint_callbacks):
        logger = trainer.logger
        root = getattr(logger, "root_dir", None) if logger is not None else None
        if root is not None and Path(root).is_dir():
            dirs += sorted(p / "checkpoints" for p in Path(root).iterdir() if p.is_dir())
        elif logger is None:
            dirs.append(Path(trainer.default_root_dir) / "checkpoints")
    return dirs


def find_last_checkpoint(trainer: Any) -> Path | None:
    """The most recently written ``last*.ckpt`` in this run's checkpoint folders, or None."""
    candidates = [p for d in _checkpoint_dirs(trainer) if d.is_dir() for p in d.glob("last*.ckpt") if p.is_file()]
    if not candidates:
        return None
    return max(candidates, key=lambda p: p.stat().st_mtime_ns)


def _continue_logger_version(trainer: Any, ckpt: Path) -> None:
    """Point the logger at the version folder that holds ``ckpt`` (instead of opening a new one)."""
    logger = trainer.logger
    root = getattr(logger, "root_dir", None) if logger is not None else None
    if root is None or not hasattr(logger, "_version") or getattr(logger, "_experiment", None) is not None:
        return
    version_dir = ckpt.parent.parent
    if ckpt.parent.name != "checkpoints" or version_dir.parent.resolve() != Path(root).resolve():
        return
    name = version_dir.name
    logger._version = int(name[len("version_") :]) if name.startswith("version_") and name[8:].isdigit() else name


def run_cli(subcommand: str, argv: Sequence[str]) -> MedMAECLI:
    """Run one LightningCLI subcommand with medmae's model and datamodule.

    LightningCLI reads ``sys.argv`` itself (and warns when given ``args`` beside it), so the command
    line it sees is set to exactly ``medmae <subcommand> <argv>`` for the duration of the run.
    """
    saved = sys.argv
    sys.argv = ["medmae", subcommand, *argv]
    try:
        return MedMAECLI(
            MAEPretrainModule,
            CacheDataModule,
            seed_everything_default=0,
            save_config_kwargs={"overwrite": True},
        )
    finally:
        sys.argv = saved


def fit_main(argv: Sequence[str]) -> int:
    run_cli("fit", argv)
    return 0


def validate_main(argv: Sequence[str]) -> int:
    run_cli("validate", argv)
    return 0
