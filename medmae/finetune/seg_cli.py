"""``medmae finetune-seg`` (LightningCLI) and ``medmae predict-seg`` (NIfTI masks from a checkpoint).

Launch::

    medmae finetune-seg --config configs/finetune/seg_tiny_cpu.yaml \\
        --model.init medmae:encoder/ --data.csv cases.csv
    medmae finetune-seg --config configs/finetune/seg_tiny_cpu.yaml \\
        --model.init random:encoder/ --data.csv cases.csv          # the baseline: same model, no weights
    medmae predict-seg runs/seg/version_0/checkpoints/last.ckpt scan1.nii.gz scan2/ --out masks/

``model.init``, ``model.num_classes`` and ``model.card`` are linked to the data module, so both read
the same card. Configuration and input mistakes stop with one line naming the field or file.

A 3D export (``medmae_vit3d``) fine-tunes MONAI UNETR 3D on random patches
(``configs/finetune/seg3d_*.yaml``); ``predict-seg`` then segments whole volumes by sliding windows
of the card's size (``--overlap``, ``--batch`` windows per forward pass).
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
from medmae.export.volume_preprocessing import VolumePreprocessor
from medmae.finetune.encoders import Preprocessor
from medmae.finetune.seg_data import SegmentationDataModule
from medmae.finetune.segment import SegmentationModule, Segmenter, load_segmenter, predict_planes
from medmae.finetune.segment3d import predict_volume3d
from medmae.finetune.volumes import Volume, VolumeError, read_image


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
        net, pre, _ = load_segmenter(args.checkpoint)
    except ValueError as e:
        parser.error(str(e))
    args.out.mkdir(parents=True, exist_ok=True)
    for ref in args.images:
        try:
            written = predict_volume(net, pre, ref, args.out, args.modality, args.batch, args.overlap)
        except VolumeError as e:
            parser.error(str(e))
        print(f"{ref} -> {written}")
    return 0


def predict_volume(
    net: Segmenter,
    pre: Preprocessor,
    reference: str,
    out_dir: Path,
    modality: str = "OT",
    batch: int = 16,
    overlap: float = 0.25,
) -> Path:
    """Segment one volume; the mask keeps the input NIfTI's voxel order and affine (DICOM: canonical, RAS)."""
    volume = read_image(reference, modality=modality)
    if isinstance(pre, VolumePreprocessor):
        try:
            image = pre.image(volume.array, volume.intensity, volume.stats, volume.spacing)
        except ValueError as e:
            raise VolumeError(f"{reference}: {e}") from None
        canonical = predict_volume3d(net, image, pre, volume.shape, volume.spacing, overlap, batch)
    else:
        assert isinstance(pre, PlanePreprocessor)
        planes = pre.planes(volume.array, volume.intensity, volume.stats, spacing=volume.spacing)
        stack_shape = pre.stack(volume.array).shape
        pred = predict_planes(net, planes, pre, tuple(stack_shape[1:]), batch)
        canonical = np.zeros(volume.shape, dtype=np.uint8)
        pre.stack(canonical)[...] = pred  # the plane view writes through to the (Z, Y, X) array
    return write_mask(volume, canonical, out_dir)


def write_mask(volume: Volume, canonical: np.ndarray, out_dir: Path) -> Path:
    """Write a canonical (Z, Y, X) class map as ``<name>_seg.nii.gz`` in the input's voxel order and affine."""
    import nibabel as nib

    from data_prep.build import RAS_TO_LPS

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
