"""What a NIfTI file says about itself beyond its header: its JSON sidecar, and so its modality.

A NIfTI header has no modality, so without help a dcm2niix-converted CT would be stored as ``OT``:
percentile-scaled instead of HU-windowed, invisible to a ``modalities: [CT]`` filter. dcm2niix (and
BIDS) write ``<stem>.json`` next to ``<stem>.nii`` / ``<stem>.nii.gz``; the modality of a NIfTI is
the first of these that says something (docs/data_prep.md, "NIfTI modality"):

1. ``--nifti-modality`` rules (``MOD`` or ``PATTERN=MOD``), the first matching rule;
2. the sidecar's ``Modality``;
3. a BIDS MR suffix (``_T1w``, ``_bold``, ...): ``MR``;
4. ``OT``.

Sidecars hold names, dates, institutions and device serials too: only ``Modality``, ``ImageType``
and ``BurnedInAnnotation`` are taken, kept in memory, and never written or logged. A sidecar that
is too large, unreadable or oddly typed is ignored (``problem`` says why), never fatal.
"""

from __future__ import annotations

import json
import os
import re
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase

#: The most bytes of a JSON sidecar that are read (dcm2niix writes a few KB).
SIDECAR_MAX_BYTES = 1 << 20
#: NIfTI names a sidecar ``<stem>.json`` can belong to, in the order they claim it.
NIFTI_SUFFIXES = (".nii", ".nii.gz")
SIDECAR_SUFFIX = ".json"
_MODALITY_CODE = re.compile(r"[A-Z0-9]{1,16}")

#: BIDS anatomical/functional/diffusion suffixes that say "this NIfTI is MR".
BIDS_MR_SUFFIXES = (
    "t1w", "t2w", "pdw", "t2starw", "flair", "inplanet1", "inplanet2", "pdt2", "angio", "bold", "cbv",
    "dwi", "sbref", "epi", "magnitude", "magnitude1", "magnitude2", "phasediff", "fieldmap", "mese",
    "megre", "t1map", "t2map", "unit1", "swi",
)


def is_modality_code(text: str) -> bool:
    """A DICOM modality code as we accept it: upper-case letters and digits, 1 to 16 of them."""
    return _MODALITY_CODE.fullmatch(text) is not None


# ----------------------------------------------------------------------------- sidecar files


@dataclass(frozen=True, slots=True)
class NiftiSidecar:
    """The facts taken from a NIfTI's JSON sidecar (memory only; the rest of the file is never kept).

    ``problem`` is a fixed phrase saying what was ignored (never any of the file's content).
    """

    modality: str | None = None
    image_type: tuple[str, ...] = ()
    burned_in: str = ""
    problem: str | None = None


def nifti_of_sidecar(json_path: str) -> str | None:
    """The NIfTI that ``<stem>.json`` describes: ``<stem>.nii``, else ``<stem>.nii.gz``, if one exists."""
    if not json_path.endswith(SIDECAR_SUFFIX):
        return None
    stem = json_path[: -len(SIDECAR_SUFFIX)]
    return next((stem + s for s in NIFTI_SUFFIXES if os.path.lexists(stem + s)), None)


def sidecar_of_nifti(nifti_path: str) -> str | None:
    """The JSON sidecar that belongs to this NIfTI, if any (the pairing :func:`nifti_of_sidecar` makes,
    so ``x.nii`` and ``x.nii.gz`` side by side never both claim ``x.json``)."""
    for suffix in NIFTI_SUFFIXES:
        if nifti_path.endswith(suffix):
            candidate = nifti_path[: -len(suffix)] + SIDECAR_SUFFIX
            if os.path.lexists(candidate) and nifti_of_sidecar(candidate) == nifti_path:
                return candidate
    return None


class _Ignored(Exception):
    """Internal: the sidecar is ignored as a whole; the message is a fixed phrase."""


def read_sidecar(path: str) -> NiftiSidecar:
    """Parse a sidecar without ever raising: a file over ``SIDECAR_MAX_BYTES``, unreadable, not JSON
    or not an object is ignored as a whole; a field of the wrong type is ignored alone."""
    try:
        doc = json.loads(_read_capped(path))
    except _Ignored as e:
        return NiftiSidecar(problem=str(e))
    except OSError:
        return NiftiSidecar(problem="unreadable")
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError; RecursionError: [[[[...]]]]
        return NiftiSidecar(problem="not valid JSON")
    if not isinstance(doc, dict):
        return NiftiSidecar(problem="not a JSON object")
    return _facts(doc)


def _read_capped(path: str) -> bytes:
    """At most ``SIDECAR_MAX_BYTES`` of a regular file (a FIFO or device is never read: it could block)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise _Ignored("not a regular file")
        data = f.read(SIDECAR_MAX_BYTES + 1)
    if len(data) > SIDECAR_MAX_BYTES:
        raise _Ignored(f"larger than {SIDECAR_MAX_BYTES >> 20} MiB")
    return data


def _facts(doc: dict) -> NiftiSidecar:
    problems = []
    modality = doc.get("Modality")
    if modality is not None:
        modality = modality.strip().upper() if isinstance(modality, str) else None
        if modality is None or not is_modality_code(modality):
            problems.append("its Modality is not a DICOM modality code")
            modality = None
    image_type = doc.get("ImageType", [])
    if isinstance(image_type, str):  # a DICOM-style "ORIGINAL\\PRIMARY" string
        image_type = image_type.split("\\")
    if not (isinstance(image_type, list) and all(isinstance(v, str) for v in image_type)):
        problems.append("its ImageType is not a list of strings")
        image_type = []
    burned_in = doc.get("BurnedInAnnotation", "")
    if not isinstance(burned_in, str):
        problems.append("its BurnedInAnnotation is not a string")
        burned_in = ""
    return NiftiSidecar(
        modality=modality,
        image_type=tuple(v.strip().upper() for v in image_type),
        burned_in=burned_in.strip(),
        problem="; ".join(problems) or None,
    )


# ----------------------------------------------------------------------------- modality decision


@dataclass(frozen=True, slots=True)
class ModalityRule:
    """One ``--nifti-modality`` rule: NIfTI files matching ``pattern`` (None: every one) are ``modality``."""

    pattern: str | None
    modality: str

    @property
    def text(self) -> str:
        """The rule as it is written on the command line (canonical form)."""
        return self.modality if self.pattern is None else f"{self.pattern}={self.modality}"

    def matches(self, path_in_archive: str, absolute_path: str) -> bool:
        """fnmatch (case-sensitive; ``*`` crosses folders) on the path relative to its archive or the absolute one."""
        if self.pattern is None:
            return True
        return fnmatchcase(path_in_archive, self.pattern) or fnmatchcase(absolute_path, self.pattern)


def parse_modality_rule(text: str) -> ModalityRule:
    """``MOD`` or ``PATTERN=MOD`` (split at the last ``=``).

    Raises:
        ValueError: a one-line message; callers prefix the option's name.
    """
    pattern, sep, modality = text.rpartition("=")
    if sep and not pattern:
        raise ValueError(f"empty pattern in {text!r} (write MOD alone for every NIfTI)")
    if not is_modality_code(modality):
        raise ValueError(
            f"{modality!r} is not a DICOM modality code (upper-case letters and digits, at most 16, e.g. CT)"
        )
    return ModalityRule(pattern if sep else None, modality)


@dataclass(frozen=True, slots=True)
class ModalityDecision:
    """A NIfTI's modality, where it came from (``medmae.data.cache.MODALITY_SOURCES``), and the
    sidecar's modality when a rule overrode a different one (worth a warning)."""

    modality: str
    source: str
    overridden: str | None = None


def nifti_modality(
    rel: str, path: str, sidecar: NiftiSidecar | None, rules: Sequence[ModalityRule] = ()
) -> ModalityDecision:
    """Decide a NIfTI's modality: option > sidecar > BIDS suffix > ``OT`` (module docstring).

    ``rel`` is ``"<archive index>/<path in the archive>"``; ``path`` the path it was found at.
    """
    said = sidecar.modality if sidecar is not None else None
    in_archive = rel.split("/", 1)[-1]
    absolute = os.path.abspath(path)
    for rule in rules:
        if rule.matches(in_archive, absolute):
            return ModalityDecision(rule.modality, "option", said if said not in (None, rule.modality) else None)
    if said is not None:
        return ModalityDecision(said, "sidecar")
    if _has_bids_mr_suffix(rel):
        return ModalityDecision("MR", "bids_suffix")
    return ModalityDecision("OT", "default")


def _has_bids_mr_suffix(rel: str) -> bool:
    name = rel.rsplit("/", 1)[-1].lower()
    return any(name.endswith(f"_{s}{ext}") for s in BIDS_MR_SUFFIXES for ext in NIFTI_SUFFIXES)
