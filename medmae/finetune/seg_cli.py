"""``medmae finetune-seg`` (LightningCLI) and ``medmae predict-seg`` (NIfTI masks from a checkpoint).

Launch::

    medmae finetune-seg --config configs/finetune/seg_tiny_cpu.yaml \\
        --model.init medmae:encoder/ --data.csv cases.csv
    medmae finetune-seg --config configs/finetune/seg_tiny_cpu.yaml \\
        --model.init random:encoder/ --data.csv cases.csv          # the baseline: same model, no weights
    medmae predict-seg runs/seg/version_0/checkpoints/last.ckpt scan1.nii.gz scan2/ --out masks/

``model.init``, ``model.num_classes`` and ``model.card`` are linked to the data module, so both read
the same card. Configuration and input mistakes stop with one line naming the field or file.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from lightning.pytorch.cli import LightningCLI

from medmae.export.card import CardError
from medmae.export.preprocessing import PlanePreprocessor
from medmae.finetune.seg_data import SegmentationDataModule
from medmae.finetune.segment import SegmentationModule, Segmenter, load_segmenter, predict_planes
from medmae.finetune.volumes import VolumeError, read_image


class SegmentationCLI(LightningCLI):
    """LightningCLI with linked model/data fields and one-line errors for bad configs and inputs."""

    def add_arguments_to_parser(self, parser) -> None:  # type: ignore[no-untyped-def]
        parser.link_arguments("model.init", "data.init")
        parser.link_arguments("model.num_classes", "data.num_classes")
        parser.link_arguments("model.card", "data.card")

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


def finetune_main(argv: Sequence[str]) -> int:
    saved = sys.argv
    # finetune-seg is always LightningCLI's `fit` (so --ckpt_path resumes); -h/--help shows fit's options
    sys.argv = ["medmae finetune-seg", "fit", *argv]
    try:
        SegmentationCLI(
            SegmentationModule,
            SegmentationDataModule,
            seed_everything_default=0,
            save_config_kwargs={"overwrite": True},
        )
    finally:
        sys.argv = saved
    return 0


def predict_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="medmae predict-seg", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("checkpoint", type=Path, help="checkpoint written by `medmae finetune-seg`")
    parser.add_argument("images", nargs="+", help="NIfTI files or DICOM series folders")
    parser.add_argument("--out", type=Path, required=True, help="folder for the <name>_seg.nii.gz masks")
    parser.add_argument("--modality", default="OT", help="modality of NIfTI inputs (CT -> HU windows)")
    parser.add_argument("--batch", type=int, default=16, help="planes per forward pass")
    args = parser.parse_args(list(argv))
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"--out {args.out} is a file; give a folder")
    try:
        net, pre, _ = load_segmenter(args.checkpoint)
    except ValueError as e:
        parser.error(str(e))
    args.out.mkdir(parents=True, exist_ok=True)
    for ref in args.images:
        try:
            written = predict_volume(net, pre, ref, args.out, args.modality, args.batch)
        except VolumeError as e:
            parser.error(str(e))
        print(f"{ref} -> {written}")
    return 0


def predict_volume(
    net: Segmenter, pre: PlanePreprocessor, reference: str, out_dir: Path, modality: str = "OT", batch: int = 16
) -> Path:
    """Segment one volume; the mask keeps the input NIfTI's voxel order and affine (DICOM: canonical, RAS)."""
    import nibabel as nib

    from data_prep.build import RAS_TO_LPS

    volume = read_image(reference, modality=modality)
    planes = pre.planes(volume.array, volume.intensity, volume.stats, spacing=volume.spacing)
    stack_shape = pre.stack(volume.array).shape
    pred = predict_planes(net, planes, pre, tuple(stack_shape[1:]), batch)
    canonical = np.zeros(volume.shape, dtype=np.uint8)
    pre.stack(canonical)[...] = pred  # the plane view writes through to the (Z, Y, X) array
    if volume.source_ornt is not None:
        data, affine = volume.to_source(canonical), volume.source_affine
    else:
        data, affine = canonical.transpose(2, 1, 0), RAS_TO_LPS @ volume.affine
    name = volume.name
    for suffix in (".nii.gz", ".nii"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
    path = out_dir / f"{name}_seg.nii.gz"
    img = nib.Nifti1Image(np.ascontiguousarray(data), affine)
    img.set_data_dtype(np.uint8)
    nib.save(img, str(path))
    return path
