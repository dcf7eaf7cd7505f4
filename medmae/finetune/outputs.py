"""Where prediction writes, decided before anything is computed: never over an input, never over a result.

* One mask per input, named ``<name>_seg.nii.gz`` (``name``: the NIfTI file's stem or the DICOM
  folder's name). When two inputs share a name (``a/ct.nii.gz``, ``b/ct.nii.gz``), every mask mirrors
  its input's path below the inputs' common folder (``OUT/a/ct_seg.nii.gz``, ``OUT/b/ct_seg.nii.gz``),
  so no mask replaces another.
* An output that is an input, or lies inside an input DICOM folder, is refused.
* An existing output is replaced only with ``--overwrite``; outputs are written to a temporary file
  in the same folder and renamed, so an interrupted run leaves no half-written file.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

NIFTI_SUFFIXES = (".nii.gz", ".nii")


class OutputError(ValueError):
    """Writing here would overwrite an input or an earlier result; the message says which and how to proceed."""


def output_stem(path: Path) -> str:
    """A NIfTI file's name without ``.nii``/``.nii.gz``; a folder's name as it is."""
    name = path.name
    for suffix in NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def plan_outputs(inputs: Sequence[str], out_dir: Path, suffix: str, overwrite: bool = False) -> dict[str, Path]:
    """Input reference -> the file its result goes to (module docstring); :class:`OutputError` otherwise."""
    resolved = [Path(os.path.abspath(ref)) for ref in inputs]
    seen: dict[Path, str] = {}
    for ref, path in zip(inputs, resolved, strict=True):
        if path in seen:
            raise OutputError(f"{ref}: given twice (also as {seen[path]})")
        seen[path] = ref
    names = [output_stem(p) + suffix for p in resolved]
    out_dir = Path(os.path.abspath(out_dir))
    if len(set(names)) == len(names):
        targets = [out_dir / n for n in names]
    else:  # same names: mirror each input's place below the inputs' common folder
        common = Path(os.path.commonpath([str(p.parent) for p in resolved]))
        targets = [out_dir / p.parent.relative_to(common) / n for p, n in zip(resolved, names, strict=True)]
    plan = dict(zip(inputs, targets, strict=True))
    claimed: dict[Path, str] = {}
    for ref, target in plan.items():  # x.nii and x.nii.gz side by side: one name, one folder
        if target in claimed:
            raise OutputError(f"{ref} and {claimed[target]} would both write {target}; predict them separately")
        claimed[target] = ref
    for ref, target in plan.items():
        check_target(target, resolved, overwrite, ref)
    return plan


def check_target(target: Path, inputs: Sequence[Path], overwrite: bool, ref: str) -> None:
    """Refuse ``target`` when it is an input, lies in an input folder, or exists without ``overwrite``."""
    target = Path(os.path.abspath(target))
    for source in inputs:
        if target == source or (source.is_dir() and _inside(target, source)):
            raise OutputError(f"{target}: the result for {ref} would overwrite or sit inside the input {source}")
    if target.exists() and not overwrite:
        raise OutputError(f"{target}: exists; pass --overwrite to replace it")
    if target.exists() and not target.is_file():
        raise OutputError(f"{target}: exists and is not a file")


def write_atomically(target: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` then rename onto ``target``: readers never see a half-written file.

    ``tmp`` keeps ``target``'s suffixes (writers such as nibabel choose the format by name).
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(target.suffixes)
    fd, tmp = tempfile.mkstemp(prefix=".partial-", suffix=suffix, dir=target.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
