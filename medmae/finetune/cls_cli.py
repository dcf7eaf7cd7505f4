"""``medmae finetune-cls``: LightningCLI over ClassificationModule + ClassificationDataModule.

Launch::

    medmae finetune-cls --config configs/finetune/cls_tiny_cpu.yaml \\
        --model.init medmae:encoder/ --data.csv labels.csv
    medmae finetune-cls --config configs/finetune/cls_tiny_cpu.yaml \\
        --model.init random:encoder/ --data.csv labels.csv           # the baseline: same model, no weights
    medmae finetune-cls --config configs/finetune/cls_vit_base.yaml --model.init medmae:encoder/ \\
        --data.csv labels.csv --model.linear_probe true               # frozen encoder, BN + linear head
    medmae finetune-cls --config ... --model.task multiclass --model.classes '[normal, benign, malignant]'

``model.init``, ``model.card``, ``model.task``, ``model.classes`` and ``model.level`` are linked to the
data module, so both read the same card and the same classes. Configuration and input mistakes (a
card with a missing field, a CSV row pointing at nothing, a missing label column, a label outside the
declared classes) stop before training with one line naming the file and the field.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import NoReturn

from lightning.pytorch.cli import LightningCLI

from medmae.finetune.classify import ClassificationModule
from medmae.finetune.cls_data import ClassificationDataModule
from medmae.train.cli import lightning_command, resolve_last_checkpoint

#: errors of configuration and input (the user's to fix), not bugs
INPUT_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, PermissionError)
LINKED = ("init", "card", "task", "classes", "level")


class ClassificationCLI(LightningCLI):
    """LightningCLI with linked model/data fields and one-line errors for bad configs and inputs."""

    def add_arguments_to_parser(self, parser) -> None:  # type: ignore[no-untyped-def]
        for name in LINKED:
            parser.link_arguments(f"model.{name}", f"data.{name}")

    def fail(self, message: str) -> NoReturn:
        """Print ``medmae finetune-cls: error: <message>`` on one line and exit with status 2."""
        sys.stderr.write(f"medmae finetune-cls: error: {' '.join(str(message).split())}\n")
        raise SystemExit(2)

    def parse_arguments(self, parser, args) -> None:  # type: ignore[no-untyped-def]
        """Parse, then check ``--ckpt_path`` before LightningCLI loads it for its hyper-parameters: a file
        refused by safe unpickling is one line, exit 2."""
        super().parse_arguments(parser, args)
        from medmae.finetune.checkpoints import precheck_ckpt_path

        precheck_ckpt_path(self, "medmae finetune-cls")

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except INPUT_ERRORS as e:
            self.fail(f"invalid configuration: {e}")

    def before_fit(self) -> None:
        model, data = self.model, self.datamodule
        if model.hparams.linear_probe and model.hparams.level == "series" and data.batch_size < 2:
            self.fail("data.batch_size must be >= 2 for a series-level linear probe (its BatchNorm needs 2 series)")
        try:
            data.setup("fit")
        except INPUT_ERRORS as e:
            self.fail(f"invalid input: {e}")
        resolve_last_checkpoint(self, "medmae finetune-cls")  # --ckpt_path last: as `medmae fit`
        from medmae.finetune.checkpoints import precheck_ckpt_path

        precheck_ckpt_path(self, "medmae finetune-cls", resolved=True)


def run_cli(argv: Sequence[str]) -> ClassificationCLI:
    """``fit`` with medmae's classifier (always LightningCLI's ``fit``, so ``--ckpt_path`` resumes)."""
    with lightning_command("finetune-cls", "fit", argv) as args:
        return ClassificationCLI(ClassificationModule, ClassificationDataModule, seed_everything_default=0,
                                 save_config_kwargs={"overwrite": True}, args=args,
                                 parser_kwargs={"prog": "medmae finetune-cls"})


def finetune_main(argv: Sequence[str]) -> int:
    run_cli(argv)
    return 0
