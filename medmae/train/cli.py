"""``medmae fit`` / ``medmae validate``: LightningCLI over MAEPretrainModule + CacheDataModule.

Launch::

    medmae fit --config configs/pretrain/vit_base_gray_224.yaml
    medmae fit --config configs/pretrain/tiny_cpu.yaml --data.cache_dir /data/cache --trainer.max_steps 100
    # several GPUs / nodes: set trainer.devices / trainer.num_nodes (strategy ddp); under SLURM use srun
    medmae fit --config configs/pretrain/vit_base_gray_224.yaml --ckpt_path runs/.../last.ckpt   # resume

Configuration mistakes (an unknown key, an image size that is not a multiple of the patch, a model
whose ``in_chans`` differs from the channels the data yields) stop before training with a message
that names the field.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from lightning.pytorch.cli import LightningCLI

from medmae.data import CacheDataModule
from medmae.train.module import MAEPretrainModule


class MedMAECLI(LightningCLI):
    """LightningCLI that turns configuration errors into a one-line parser error before training."""

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except ValueError as e:
            self.parser.error(f"invalid configuration: {e}")

    def before_fit(self) -> None:
        self._check_compatible()

    def before_validate(self) -> None:
        self._check_compatible()

    def _check_compatible(self) -> None:
        try:
            self.model.check_data_compatible(self.datamodule)
        except ValueError as e:
            self.parser.error(f"invalid configuration: {e}")


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
