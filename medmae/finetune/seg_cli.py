"""``medmae finetune-seg`` (LightningCLI) and ``medmae predict-seg`` (NIfTI masks from a checkpoint).

Launch::

    medmae finetune-seg --config configs/finetune/seg_tiny_cpu.yaml \\
        --model.init medmae:encoder/ --data.csv cases.csv
    medmae finetune-seg --config configs/finetune/seg_tiny_cpu.yaml \\
        --model.init random:encoder/ --data.csv cases.csv          # the baseline: same model, no weights
    medmae predict-seg runs/seg/version_0/checkpoints/last.ckpt scan1.nii.gz scan2/ --out masks/

``predict-seg`` reads every input as fine-tuning did: the checkpoint keeps the preprocessing and the
NIfTI modality rule (``data.modality``, else each file's JSON sidecar, as in prep). It never writes
over an input or an existing mask (``--overwrite`` replaces masks); inputs that share a name get masks
that mirror their sub-folders (:mod:`medmae.finetune.outputs`).

``model.init``, ``model.num_classes`` and ``model.card`` are linked to the data module, so both read
the same card. Configuration and input mistakes stop with one line naming the field or file.

A 3D export (``medmae_vit3d``) fine-tunes MONAI UNETR 3D on random patches
(``configs/finetune/seg3d_*.yaml``); ``predict-seg`` then segments whole volumes by sliding windows
of the card's size (``--overlap``, ``--batch`` windows per forward pass).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch.cli import LightningCLI

from medmae.export.card import CardError
from medmae.finetune.cases import check_modality
from medmae.finetune.dims import dims_for
from medmae.finetune.encoders import Preprocessor
from medmae.finetune.outputs import plan_outputs, write_atomically
from medmae.finetune.seg_data import SegmentationDataModule
from medmae.finetune.segment import LoadedSegmenter, SegmentationModule, load_segmenter
from medmae.finetune.volumes import (
    Volume,
    VolumeError,
    add_modality_option,
    prediction_modality,
    read_image,
)
from medmae.train.cli import lightning_command, resolve_last_checkpoint

#: the mask written for input NAME(.nii.gz): NAME_seg.nii.gz
MASK_SUFFIX = "_seg.nii.gz"


class SegmentationCLI(LightningCLI):
    """LightningCLI with linked model/data fields and one-line errors for bad configs and inputs."""

    def add_arguments_to_parser(self, parser) -> None:  # type: ignore[no-untyped-def]
        parser.link_arguments("model.init", "data.init")
        parser.link_arguments("model.num_classes", "data.num_classes")
        parser.link_arguments("model.card", "data.card")

    def parse_arguments(self, parser, args) -> None:  # type: ignore[no-untyped-def]
        """Parse, then check ``--ckpt_path`` before LightningCLI loads it for its hyper-parameters: a file
        refused by safe unpickling, or whose hyper-parameters exceed the limits, is one line, exit 2."""
        super().parse_arguments(parser, args)
        from medmae.finetune.checkpoints import precheck_ckpt_path

        precheck_ckpt_path(self, "medmae finetune-seg", _check_resumed_hparams)

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except (ValueError, OSError) as e:
            self.parser.error(f"invalid configuration: {e}")

    def before_fit(self) -> None:
        try:
            self.datamodule.setup("fit")
        except (VolumeError, CardError, ValueError) as e:
            self.parser.error(f"invalid input: {e}")
        resolve_last_checkpoint(self, "medmae finetune-seg")  # --ckpt_path last: as `medmae fit`
        from medmae.finetune.checkpoints import precheck_ckpt_path

        precheck_ckpt_path(self, "medmae finetune-seg", _check_resumed_hparams, resolved=True)


def _check_resumed_hparams(ckpt: dict, where: str) -> None:
    """LightningCLI builds the resumed model with the checkpoint's hyper-parameters: its sizes must be
    within the limits before anything is allocated."""
    from medmae.export.card import LIMITS, read_int

    hp = ckpt.get("hyper_parameters", {})
    if "num_classes" in hp:
        read_int(hp, "num_classes", where, 2, LIMITS["num_classes"])
    if "feature_size" in hp:
        read_int(hp, "feature_size", where, 1, LIMITS["feature_size"])


def finetune_main(argv: Sequence[str]) -> int:
    # finetune-seg is always LightningCLI's `fit` (so --ckpt_path resumes); -h/--help shows fit's options
    with lightning_command("finetune-seg", "fit", argv) as args:
        SegmentationCLI(
            SegmentationModule,
            SegmentationDataModule,
            seed_everything_default=0,
            save_config_kwargs={"overwrite": True},
            args=args,
            parser_kwargs={"prog": "medmae finetune-seg"},
        )
    return 0


def predict_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="medmae predict-seg", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("checkpoint", type=Path, help="checkpoint written by `medmae finetune-seg`")
    parser.add_argument("images", nargs="+", help="NIfTI files or DICOM series folders")
    parser.add_argument("--out", type=Path, required=True, help="folder for the <name>_seg.nii.gz masks")
    add_modality_option(parser)
    parser.add_argument("--overwrite", action="store_true", help="replace masks that already exist")
    parser.add_argument("--batch", type=int, default=16, help="planes (2D) or sliding windows (3D) per forward pass")
    parser.add_argument("--overlap", type=float, default=0.25, help="3D: overlap of neighbouring sliding windows")
    args = parser.parse_args(list(argv))
    if not 0.0 <= args.overlap < 1.0:
        parser.error(f"--overlap must be in [0, 1), got {args.overlap}")
    if args.batch < 1:
        parser.error(f"--batch must be >= 1, got {args.batch}")
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"--out {args.out} is a file; give a folder")
    try:
        requested = check_modality(args.modality, "--modality")
        plan = plan_outputs(args.images, args.out, MASK_SUFFIX, args.overwrite)
        model = load_segmenter(args.checkpoint)
        modalities = {ref: prediction_modality(ref, model.nifti_modality, requested) for ref in args.images}
    except ValueError as e:  # OutputError, VolumeError, checkpoint errors: one line each
        parser.error(str(e))
    for ref in args.images:
        try:
            canonical, volume = predict_volume(model, ref, modalities[ref], args.batch, args.overlap)
            write_mask(volume, canonical, plan[ref])
        except VolumeError as e:
            parser.error(str(e))
        print(f"{ref} -> {plan[ref]}")
    return 0


def encoder_input(pre: Preprocessor, volume: Volume) -> torch.Tensor:
    """What the encoder sees of a whole volume: its planes ``(N, C, H, W)`` (2D) or the resampled
    volume ``(C, z, y, x)`` (3D), by the checkpoint's preprocessing (the card's, as in pretraining)."""
    try:
        return dims_for(pre).encoder_input(pre, volume)  # type: ignore[arg-type]
    except ValueError as e:
        raise VolumeError(f"{volume.name}: {e}") from None


def predict_volume(
    model: LoadedSegmenter, reference: str, modality: str | None = None, batch: int = 16, overlap: float = 0.25
) -> tuple[np.ndarray, Volume]:
    """The canonical (Z, Y, X) class map of one input, and the volume it was read as."""
    volume = read_image(reference, modality=modality)
    pre, image = model.preprocessing, encoder_input(model.preprocessing, volume)
    return dims_for(pre).predict_volume(model.net, pre, volume, image, batch, overlap), volume  # type: ignore[arg-type]


def write_mask(volume: Volume, canonical: np.ndarray, path: Path) -> Path:
    """Write a canonical (Z, Y, X) class map to ``path`` in the input's voxel order and affine
    (NIfTI inputs: their own; DICOM: canonical, RAS)."""
    import nibabel as nib

    from data_prep.build import RAS_TO_LPS

    if volume.source_ornt is not None:
        data, affine = volume.to_source(canonical), volume.source_affine
    else:
        data, affine = canonical.transpose(2, 1, 0), RAS_TO_LPS @ volume.affine
    img = nib.Nifti1Image(np.ascontiguousarray(data), affine)
    img.set_data_dtype(np.uint8)
    write_atomically(path, lambda tmp: nib.save(img, str(tmp)))
    return path
