"""The ``medmae`` command: one entry point, one subcommand per stage of the flow.

    medmae prep ARCHIVE_DIR --out CACHE_DIR      # archive -> de-identified cache (data_prep)
    medmae fit --config configs/pretrain/X.yaml  # MAE pretraining (LightningCLI)
    medmae validate --config ... --ckpt_path ... # validation loss of a checkpoint (LightningCLI)
    medmae export CKPT --out DIR                 # encoder.safetensors + encoder.json for fine-tuning
    medmae finetune-seg --config configs/finetune/seg_*.yaml --model.init medmae:encoder/
    medmae predict-seg CKPT IMAGE... --out DIR   # NIfTI masks with the input's affine
    medmae finetune-cls --config configs/finetune/cls_*.yaml --model.init medmae:encoder/
    medmae predict-cls CKPT IMAGE... --out probs.csv  # class probabilities per series (and per plane)
    medmae demo                                  # prep + pretrain + export on bundled sample scans

Each subcommand owns its own argument parser; this module only dispatches, importing lazily so
``medmae --help`` is instant.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

_SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "prep": ("data_prep.cli:main", "scan a DICOM/NIfTI archive and build the de-identified training cache"),
    "fit": ("medmae.train.cli:fit_main", "pretrain an MAE from a LightningCLI YAML config"),
    "validate": ("medmae.train.cli:validate_main", "compute the validation loss of a checkpoint"),
    "export": ("medmae.export.cli:main", "export the encoder of a checkpoint as safetensors + JSON card"),
    "finetune-seg": (
        "medmae.finetune.seg_cli:finetune_main",
        "fine-tune segmentation (UNETR / light decoder) from an exported encoder",
    ),
    "predict-seg": (
        "medmae.finetune.seg_cli:predict_main",
        "write NIfTI masks with a fine-tuned segmentation checkpoint",
    ),
    "finetune-cls": ("medmae.finetune.cls_cli:finetune_main", "fine-tune a timm classifier from an exported encoder"),
    "predict-cls": (
        "medmae.finetune.cls_predict:predict_main",
        "write class probabilities per series (CSV) with a fine-tuned classification checkpoint",
    ),
    "demo": ("medmae.demo:main", "run prep -> pretrain on the sample scans bundled with pydicom/nibabel"),
}


def _usage() -> str:
    lines = ["usage: medmae <command> [options]", "", "commands:"]
    lines += [f"  {name:<13} {help_}" for name, (_, help_) in _SUBCOMMANDS.items()]
    lines += ["", "Run `medmae <command> --help` for the options of a command."]
    return "\n".join(lines)


def _load(target: str) -> Callable[[list[str]], int | None]:
    module_name, func_name = target.split(":")
    module = __import__(module_name, fromlist=[func_name])
    return getattr(module, func_name)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if args[0] in ("-V", "--version"):
        from medmae import __version__

        print(f"medmae {__version__}")
        return 0
    command, rest = args[0], args[1:]
    if command not in _SUBCOMMANDS:
        print(f"medmae: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    code = _load(_SUBCOMMANDS[command][0])(rest)
    return int(code or 0)


if __name__ == "__main__":
    raise SystemExit(main())
