"""``medmae predict-cls``: class probabilities per series (and per plane) from a ``finetune-cls`` checkpoint alone.

Launch::

    medmae predict-cls runs/cls/version_0/checkpoints/last.ckpt scan1.nii.gz dicom/P002_ct/ --out probs.csv
    medmae predict-cls CKPT --csv series.csv --out probs.csv --planes      # + one row per plane

Inputs are NIfTI files, DICOM series folders, or a CSV with an ``image`` column (and optionally
``modality``; other columns, labels included, are ignored) whose relative paths resolve against the
CSV's folder. Every input is read as fine-tuning read it: the checkpoint keeps the card's
preprocessing, the NIfTI modality rule (``data.modality``, else each file's JSON sidecar, as in prep)
and the plane budget (``data.max_planes``). A ``--modality`` that contradicts the checkpoint's rule or
a file's sidecar stops. The output CSV has the columns ``image, plane, p_<class>..., prediction``:
``plane`` is empty on the series row; with ``--planes`` each plane (its index along the card's axis)
follows on a row of its own. The CSV is never written over an input, and an existing one is replaced
only with ``--overwrite``.
"""

from __future__ import annotations

import argparse
import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from medmae.data.plane_transform import PlanePreprocessor
from medmae.finetune.cases import check_modality, read_rows, resolve_image
from medmae.finetune.checkpoints import read_finetune_checkpoint
from medmae.finetune.classify import CKPT_KEY, Classifier, build_classifier, series_probabilities
from medmae.finetune.cls_data import check_target, num_outputs, plane_indices, series_planes
from medmae.finetune.encoders import EncoderSource
from medmae.finetune.outputs import check_target as check_output
from medmae.finetune.outputs import write_atomically
from medmae.finetune.volumes import (
    VolumeError,
    add_modality_option,
    prediction_modality,
    read_image,
    recorded_modality,
)


@dataclass(frozen=True)
class LoadedClassifier:
    """A fine-tuned classifier ready for prediction, with the input rules of its fine-tuning."""

    net: Classifier
    preprocessing: PlanePreprocessor
    task: str
    classes: list[str]
    level: str
    nifti_modality: str | None
    max_planes: int | None
    infer_batch: int

    def columns(self) -> list[str]:
        """``p_<class>`` per output: one per class (multiclass, multilabel); binary: the positive class."""
        names = self.classes[1:] if self.task == "binary" else self.classes
        return [f"p_{c}" for c in names]

    def prediction(self, probs: torch.Tensor) -> str:
        """The predicted class (binary, multiclass) or the ``;``-joined positive labels (multilabel)."""
        if self.task == "binary":
            return self.classes[int(float(probs[0]) >= 0.5)]
        if self.task == "multiclass":
            return self.classes[int(probs.argmax())]
        return ";".join(c for c, p in zip(self.classes, probs.tolist(), strict=True) if p >= 0.5)


def load_classifier(path: str | Path) -> LoadedClassifier:
    """A fine-tuned classifier from its checkpoint alone (read with ``weights_only``: no code runs)."""
    from medmae.export.card import check_state_shapes, read_bool, read_choice, read_int
    from medmae.finetune.classify import POOLS
    from medmae.finetune.cls_data import LEVELS, TASKS

    ckpt = read_finetune_checkpoint(path, CKPT_KEY, "finetune-cls")
    record, hp = ckpt.record, ckpt.hparams
    where = str(ckpt.path)
    # untrusted: the card's validator for the encoder record, limits for the rest, shapes before building
    source = EncoderSource.from_record(record, where)
    if source.preprocessing.spatial_dims != 2:
        raise ValueError(f"{where}: a classification checkpoint needs a 2D preprocessing record")
    task = read_choice(record, "task", where, TASKS, section="record")
    try:
        classes = check_target(task, record["classes"], "checkpoint")
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{where}: malformed classification record ({e.__class__.__name__}: {e})") from None
    level = read_choice(record, "level", where, LEVELS, section="record", default=hp.get("level", "slice"))
    global_pool = read_choice(hp, "global_pool", where, POOLS, default="avg")
    linear_probe = read_bool(hp, "linear_probe", where, default=False)
    infer_batch = read_int(hp, "infer_batch", where, 1, 65536, default=64)
    modality = recorded_modality(ckpt.inputs, where)
    max_planes = (ckpt.inputs or {}).get("max_planes")
    if max_planes is not None and (isinstance(max_planes, bool) or not isinstance(max_planes, int) or max_planes < 1):
        raise ValueError(f"{where}: field 'inputs.max_planes' must be an int >= 1 or null, got {max_planes!r:.40}")

    def build() -> Classifier:
        return build_classifier(source, num_outputs(task, classes), global_pool, linear_probe=linear_probe)

    check_state_shapes(build, ckpt.net_state, where, "the recorded classifier")
    net = build()
    net.load_state_dict(ckpt.net_state, strict=True)
    return LoadedClassifier(
        net.eval(), source.preprocessing, task, classes, level, modality, max_planes, infer_batch,
    )  # fmt: skip


@dataclass(frozen=True)
class Input:
    """One series to classify: the reference as written (for the output), as read, and its row's modality."""

    name: str
    reference: str
    modality: str | None = None


def inputs_from_csv(path: Path) -> list[Input]:
    """The ``image`` (and optional ``modality``) column of a CSV; relative paths resolve against its folder."""
    columns, rows = read_rows(path, "input CSV")
    if "image" not in columns:
        raise VolumeError(f"{path}: missing column 'image' (columns: {columns})")
    out = []
    for i, row in enumerate(rows, start=2):
        where = f"{path}: row {i}"
        reference = resolve_image(row.get("image", ""), where, path.parent)
        try:
            modality = check_modality(row.get("modality"), "column 'modality'")
        except ValueError as e:
            raise VolumeError(f"{where}: {e}") from None
        out.append(Input(row["image"], reference, modality))
    return out


def classify(
    model: LoadedClassifier, item: Input, requested: str | None
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """``(series probabilities, plane probabilities, plane indices)`` of one input."""
    modality = item.modality or prediction_modality(item.reference, model.nifti_modality, requested)
    volume = read_image(item.reference, modality=modality)
    try:
        images = series_planes(volume, model.preprocessing, model.max_planes)
    except ValueError as e:
        raise VolumeError(f"{item.name}: {e}") from None
    n = model.preprocessing.for_input(volume.kind).stack(volume.array).shape[0]
    series, planes = series_probabilities(model.net, images, model.task, model.level, model.infer_batch)
    return series, planes, plane_indices(n, model.max_planes)


def predict_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="medmae predict-cls", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("checkpoint", type=Path, help="checkpoint written by `medmae finetune-cls`")
    parser.add_argument("images", nargs="*", help="NIfTI files or DICOM series folders")
    parser.add_argument("--csv", type=Path, help="a CSV with an image column (and optionally modality)")
    parser.add_argument("--out", type=Path, required=True, help="the CSV of probabilities to write")
    parser.add_argument("--planes", action="store_true", help="also write one row per plane")
    add_modality_option(parser)
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    args = parser.parse_args(list(argv))
    if not args.images and args.csv is None:
        parser.error("give images, or --csv")
    try:
        requested = check_modality(args.modality, "--modality")
        items = [Input(ref, ref) for ref in args.images]
        items += inputs_from_csv(args.csv) if args.csv is not None else []
        sources = [Path(i.reference).absolute() for i in items] + ([args.csv.absolute()] if args.csv else [])
        check_output(args.out, sources, args.overwrite, "--out")
        model = load_classifier(args.checkpoint)
        if requested is not None:  # a contradiction stops before any series is read
            for item in items:
                prediction_modality(item.reference, model.nifti_modality, requested)
        rows = []
        for item in items:
            series, planes, indices = classify(model, item, requested)
            rows.append([item.name, "", *(f"{p:.6f}" for p in series.tolist()), model.prediction(series)])
            if args.planes:
                rows += [[item.name, str(z), *(f"{p:.6f}" for p in probs.tolist()), model.prediction(probs)]
                         for z, probs in zip(indices, planes, strict=True)]
    except ValueError as e:  # VolumeError, OutputError, checkpoint and modality errors: one line each
        parser.error(str(e))

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["image", "plane", *model.columns(), "prediction"])
            w.writerows(rows)

    write_atomically(args.out, write)
    print(f"{len(items)} series -> {args.out}")
    return 0
