"""The one case table of fine-tuning and prediction: read, check and split labelled series.

Segmentation and classification read the same CSV layout (one row per series)::

    image,label,patient,split,modality
    scans/a.nii.gz,labels/a.nii.gz,P001,train,CT      # segmentation: label = a NIfTI label map
    dicom/P002_ct/,1,P002,,                            # classification: label = a class value
    cache:3f9c2a...,0,P003,val,

* ``image``: a NIfTI file, a DICOM series folder or ``cache:SERIES_ID``; relative paths resolve
  against the CSV's folder.
* the label: segmentation, a NIfTI label map (column ``label``); classification, the column
  ``label_column`` holding one of ``classes`` (multilabel: one 0/1 column per class).
* ``patient`` (optional): the split is per patient; a patient on both sides is refused.
* ``split`` (optional, ``train``/``val``): wins over the hashed split.
* ``modality`` (optional): the modality of that row's NIfTI, as ``medmae prep --nifti-modality``
  would give it (it wins over the JSON sidecar, as the option does in prep).

Segmentation also reads the folder convention ``DIR/images/NAME.nii[.gz]`` + ``DIR/labels/NAME.nii[.gz]``.

The hashed split is keyed by ``split_seed`` alone, never by the fine-tuning seed: runs that differ
only in their seed train and validate on the same patients, so a multi-seed comparison compares
initialisations, not splits. The CSV may come from Excel (a UTF-8 byte-order mark is accepted).
Every error is one line naming the file, the row and the column.
"""

from __future__ import annotations

import csv
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from data_prep.nifti_meta import is_modality_code
from medmae.finetune.volumes import NIFTI_SUFFIXES, VolumeError

SPLITS = ("train", "val")
#: what a parsed label cell becomes: a label map's path (segmentation) or a target vector (classification)
Label = str | tuple[float, ...]


@dataclass(frozen=True)
class Case:
    """One labelled series: its reference as resolved, label, patient key, split and row modality."""

    row: int
    image: str
    label: Label
    patient: str
    split: str
    modality: str | None = None

    @property
    def where(self) -> str:
        """How errors name the row (``row N`` of the CSV, 1 being the header)."""
        return f"row {self.row}"


def patient_split(patient: str, val_fraction: float, split_seed: int = 0) -> str:
    """``train`` or ``val`` for a patient key: a keyed hash, so a patient never lands on both sides."""
    digest = hashlib.sha256(f"{split_seed}:{patient}".encode()).digest()
    return "val" if int.from_bytes(digest[:8], "big") / 2**64 < val_fraction else "train"


def check_modality(value: str | None, field: str) -> str | None:
    """A modality code (``CT``, ``MR``, ...) or None; ValueError naming ``field`` otherwise."""
    if value is None or value == "":
        return None
    code = str(value).strip().upper()
    if not is_modality_code(code):
        raise ValueError(
            f"{field} must be a DICOM modality code such as CT or MR (one for every NIfTI; per-file values "
            f"go in the CSV's modality column), got {value!r}"
        )
    return code


#: parses a row's label cells: ``(row dict, "path: row N", CSV folder) -> label``
LabelParser = Callable[[dict[str, str], str, Path], Label]


def label_map_parser(column: str = "label") -> tuple[list[str], LabelParser]:
    """Segmentation labels: the column holds a NIfTI label map that must exist."""

    def parse(row: dict[str, str], where: str, base: Path) -> Label:
        value = row.get(column, "")
        if not value:
            raise VolumeError(f"{where}: column {column!r} is empty")
        path = resolve_path(value, base)
        if not path.is_file():
            raise VolumeError(f"{where}: label {value!r} points at nothing")
        return str(path)

    return [column], parse


def resolve_path(value: str, base: Path) -> Path:
    """A path as written in a CSV: absolute, or relative to the CSV's folder."""
    return Path(value) if Path(value).is_absolute() else base / value


def resolve_image(value: str, where: str, base: Path) -> str:
    """An image reference as written -> as read (``cache:`` references are kept as they are)."""
    if not value:
        raise VolumeError(f"{where}: column 'image' is empty")
    if value.startswith("cache:"):
        return value
    path = resolve_path(value, base)
    if not path.exists():
        raise VolumeError(f"{where}: image {value!r} points at nothing")
    return str(path)


def read_rows(path: Path, what: str = "case CSV") -> tuple[list[str], list[dict[str, str]]]:
    """Columns and stripped rows of a CSV (UTF-8, with or without Excel's byte-order mark)."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            raw = list(reader)
            columns = [(c or "").strip() for c in (reader.fieldnames or [])]
    except FileNotFoundError:
        raise VolumeError(f"{path}: {what} not found") from None
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise VolumeError(f"{path}: unreadable {what} ({e.__class__.__name__}: {e})") from None
    if not raw:
        raise VolumeError(f"{path}: no rows (the CSV is empty)")
    rows = [{(k or "").strip(): v.strip() if isinstance(v, str) else "" for k, v in r.items()} for r in raw]
    return columns, rows


def read_case_csv(
    path: Path,
    label_columns: Sequence[str],
    parse_label: LabelParser,
    val_fraction: float = 0.2,
    split_seed: int = 0,
    *,
    missing_label_hint: str = "",
) -> list[Case]:
    """Parse and check a case CSV (module docstring); ``parse_label`` turns a row's label cells into its label."""
    path = Path(path)
    columns, rows = read_rows(path)
    if "image" not in columns:
        raise VolumeError(f"{path}: missing column 'image' (columns: {columns})")
    missing = [c for c in label_columns if c not in columns]
    if missing:
        hint = f"{missing_label_hint}; " if missing_label_hint else ""
        raise VolumeError(f"{path}: missing label column {missing[0]!r} ({hint}columns: {columns})")
    base = path.parent
    cases = []
    for i, r in enumerate(rows, start=2):  # row 1 is the header
        where = f"{path}: row {i}"
        image = resolve_image(r.get("image", ""), where, base)
        label = parse_label(r, where, base)
        try:
            modality = check_modality(r.get("modality"), "column 'modality'")
        except ValueError as e:
            raise VolumeError(f"{where}: {e}") from None
        patient = r.get("patient", "") or image
        split = r.get("split", "").lower() or patient_split(patient, val_fraction, split_seed)
        if split not in SPLITS:
            raise VolumeError(f"{where}: column 'split' must be train or val, got {split!r}")
        cases.append(Case(i, image, label, patient, split, modality))
    check_patients(path, cases)
    return cases


def read_case_folder(folder: Path, val_fraction: float = 0.2, split_seed: int = 0) -> list[Case]:
    """Segmentation's folder convention: ``images/NAME.nii[.gz]`` paired with ``labels/NAME.nii[.gz]``."""
    images, labels = folder / "images", folder / "labels"
    if not images.is_dir() or not labels.is_dir():
        raise VolumeError(f"{folder}: expected sub-folders images/ and labels/")

    def stem(p: Path) -> str:
        return next(p.name[: -len(s)] for s in NIFTI_SUFFIXES if p.name.lower().endswith(s))

    label_of = {stem(p): p for p in labels.iterdir() if p.name.lower().endswith(NIFTI_SUFFIXES)}
    cases = []
    for i, p in enumerate(sorted(q for q in images.iterdir() if q.name.lower().endswith(NIFTI_SUFFIXES)), start=1):
        name = stem(p)
        if name not in label_of:
            raise VolumeError(f"{folder}: image {p.name} has no label labels/{name}.nii[.gz]")
        cases.append(Case(i, str(p), str(label_of[name]), name, patient_split(name, val_fraction, split_seed)))
    if not cases:
        raise VolumeError(f"{folder}: no NIfTI images in images/")
    return cases


def check_patients(path: Path, cases: Sequence[Case]) -> None:
    """A patient must be on one side only (an explicit ``split`` column can contradict itself)."""
    seen: dict[str, Case] = {}
    for case in cases:
        first = seen.setdefault(case.patient, case)
        if first.split != case.split:
            raise VolumeError(
                f"{path}: row {case.row}: patient is in split {case.split!r} but row {first.row} puts it in "
                f"{first.split!r} (a patient must be on one side only)"
            )


def split_cases(cases: Sequence[Case], where: str, max_train: int | None = None) -> tuple[list[Case], list[Case]]:
    """``(train, val)``; at least one training case (``max_train``: keep only the first N of them)."""
    train = [c for c in cases if c.split == "train"]
    val = [c for c in cases if c.split == "val"]
    if not train:
        raise VolumeError(f"{where}: no training case: every patient fell into validation (lower val_fraction)")
    return (train if max_train is None else train[:max_train]), val
