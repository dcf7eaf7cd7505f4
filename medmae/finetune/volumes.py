"""Reading labelled volumes for fine-tuning: the same readers and canonical orientation as data_prep.

An image reference is one of

* a NIfTI file (``.nii`` / ``.nii.gz``): read with data_prep's ``read_nifti`` (scl_slope applied, 4D ->
  first volume), its modality decided by prep's own rule (:func:`data_prep.nifti_meta.nifti_modality`:
  the ``modality`` option > the JSON sidecar's ``Modality`` > a BIDS MR suffix > ``OT``), stored in
  data_prep's dtype policy (HU exactly when prep would store HU) and reoriented with its ``to_canonical``;
* a DICOM series folder: run through ``data_prep.prep_archive`` into a private temporary cache, so
  series assembly, HU rescale, MONOCHROME1 and every rejection rule are exactly prep's; the folder
  must hold exactly one usable series;
* ``cache:SERIES_ID``: a series of an existing medmae cache (``cache_dir`` given separately).

Every volume ends as a canonical (Z, Y, X) array (the cache's orientation) with its LPS affine, its
intensity unit (``HU`` for CT, else ``raw``), its ``kind`` (``image``: one 2D picture such as a CR/DX/MG
radiograph, one plane under every slicing axis, as in pretraining) and the cache's statistics, which is
what :class:`~medmae.data.plane_transform.PlanePreprocessor` consumes. Errors name the file and the field.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medmae.data.cache import ManifestRow, compute_stats, load_manifest, open_series_array

logger = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii", ".nii.gz")
#: largest difference between image and label affines (mm) still taken as the same grid
AFFINE_TOLERANCE_MM = 1e-3


class VolumeError(ValueError):
    """An image or label cannot be used; the message names the file and the reason."""


@dataclass(frozen=True)
class Volume:
    """A canonical volume and what is needed to write results back in the input's own voxel order."""

    name: str
    array: np.ndarray
    affine: np.ndarray
    intensity: str
    stats: dict[str, float]
    source_affine: np.ndarray | None = None
    source_ornt: np.ndarray | None = None
    source_shape: tuple[int, ...] | None = None
    kind: str = "volume"
    modality: str = "OT"
    modality_source: str = "default"

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.array.shape)  # type: ignore[return-value]

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel spacing (Z, Y, X) in mm, from the affine (as the cache's ``spacing``): 2.5D cards with
        ``slice_spacing_mm`` place their channels with it."""
        return tuple(float(np.linalg.norm(self.affine[:3, axis])) for axis in (2, 1, 0))  # type: ignore[return-value]

    def to_source(self, canonical: np.ndarray) -> np.ndarray:
        """A canonical (Z, Y, X) array back in the input NIfTI's (x, y, z) voxel order."""
        from nibabel.orientations import apply_orientation, ornt_transform

        if self.source_ornt is None:
            raise VolumeError(f"{self.name}: not read from a NIfTI file; no source orientation to restore")
        canonical_xyz = np.asarray(canonical).transpose(2, 1, 0)
        back = ornt_transform(np.array([[0, 1], [1, 1], [2, 1]], dtype=float), self.source_ornt)
        return apply_orientation(canonical_xyz, back)


def is_nifti(path: str | Path) -> bool:
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def _read_nifti_canonical(
    path: Path, role: str = "image"
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, tuple[int, ...]]:
    """-> (canonical array, LPS affine, source RAS affine, source orientation, source shape).

    ``role`` is ``image`` or ``label``. A file with more than one volume (a 4th or later axis longer
    than 1: a time series, or a one-hot / multi-channel label) is, as an image, its first volume (as
    prep reads it) with a logged warning; as a label it is refused in one line naming the file and
    its shape: a label must be one class map of class indices.
    """
    from nibabel.orientations import io_orientation

    from data_prep.build import RAS_TO_LPS
    from data_prep.decode import read_nifti
    from data_prep.geometry import to_canonical
    from data_prep.streams import read_nifti_header

    try:  # prep's header reader: the fixed header only, never the extensions
        header_shape = tuple(int(s) for s in read_nifti_header(str(path)).get_data_shape())
        if any(s != 1 for s in header_shape[3:]):
            if role == "label":
                raise VolumeError(
                    f"{path}: a label must be one class map (X, Y, Z) of class indices, got shape {header_shape} "
                    "(a one-hot, multi-channel or time-series label); convert it to class indices, e.g. argmax "
                    "over the last axis"
                )
            logger.warning(
                "%s: NIfTI of shape %s holds %d volumes; using its first volume, as prep does",
                path, header_shape, int(np.prod(header_shape[3:])),
            )  # fmt: skip
        data, affine_ras = read_nifti(str(path))
    except VolumeError:
        raise
    except FileNotFoundError:
        raise VolumeError(f"{path}: file not found") from None
    except Exception as e:  # nibabel raises many types for truncated / foreign files
        raise VolumeError(f"{path}: unreadable NIfTI ({e.__class__.__name__}: {str(e)[:120]})") from None
    if data.dtype.kind not in "iuf":
        raise VolumeError(f"{path}: unsupported voxel type {data.dtype}")
    try:
        array, affine, _ = to_canonical(data, RAS_TO_LPS @ affine_ras)
    except ValueError as e:
        raise VolumeError(f"{path}: unusable affine ({e})") from None
    return np.ascontiguousarray(array), affine, affine_ras, io_orientation(RAS_TO_LPS @ affine_ras), data.shape


def nifti_modality_of(path: str | Path, modality: str | None = None) -> tuple[str, str, str | None]:
    """``(modality, source, sidecar's modality)`` of a NIfTI file, decided as ``medmae prep`` decides it.

    ``modality`` plays prep's ``--nifti-modality MOD`` (it wins over the sidecar); ``source`` is one of
    ``medmae.data.cache.MODALITY_SOURCES``. The sidecar is read with prep's reader (only Modality,
    ImageType and BurnedInAnnotation, in memory).
    """
    from data_prep.nifti_meta import ModalityRule, nifti_modality, read_sidecar, sidecar_of_nifti

    path = str(path)
    sidecar_path = sidecar_of_nifti(path)
    sidecar = read_sidecar(sidecar_path) if sidecar_path is not None else None
    rules = (ModalityRule(None, modality.strip().upper()),) if modality else ()
    decision = nifti_modality(Path(path).name, path, sidecar, rules)
    said = sidecar.modality if sidecar is not None else None
    return decision.modality, decision.source, said


def refuse_as_prep(path: str | Path) -> None:
    """Refuse a NIfTI whose JSON sidecar marks a localizer, burned-in text or an unvouched secondary
    capture: prep leaves it out of pretraining (``data_prep.scan.content_reason``, the same rule), so
    fine-tuning and prediction never see such a picture either."""
    from data_prep.nifti_meta import read_sidecar, sidecar_of_nifti
    from data_prep.reasons import DESCRIPTIONS
    from data_prep.scan import content_reason

    sidecar_path = sidecar_of_nifti(str(path))
    sidecar = read_sidecar(sidecar_path) if sidecar_path is not None else None
    if sidecar is None:
        return
    reason = content_reason(sidecar.image_type, sidecar.burned_in, secondary_capture=False, allow_secondary=False)
    if reason is not None:
        raise VolumeError(
            f"{Path(path).name}: refused as medmae prep refuses it ({reason.value}: {DESCRIPTIONS[reason]}, "
            "says its JSON sidecar)"
        )


def read_nifti_image(path: str | Path, modality: str | None = None) -> Volume:
    """A NIfTI image in the cache's orientation, dtype policy and statistics.

    Its modality is prep's decision (:func:`nifti_modality_of`): ``modality`` (an option, like prep's
    ``--nifti-modality``), else the JSON sidecar, else a BIDS MR suffix, else ``OT``. CT is stored and
    windowed in HU, everything else percentile-scaled, exactly as in the pretraining cache.
    """
    from data_prep.decode import NonFiniteValues, store_values
    from data_prep.series import stores_hu

    path = Path(path)
    refuse_as_prep(path)
    decided, source, said = nifti_modality_of(path, modality)
    if source == "option" and said not in (None, decided):
        logger.warning("%s: modality %s is used; its JSON sidecar says %s", path.name, decided, said)
    array, affine, affine_ras, ornt, shape = _read_nifti_canonical(path)
    hu = stores_hu(decided, secondary_capture=False)
    try:
        stored = store_values(array, hu=hu)
    except NonFiniteValues:
        raise VolumeError(f"{path}: holds NaN or Inf voxels") from None
    return Volume(
        path.name, stored, affine, "HU" if hu else "raw", compute_stats(stored), affine_ras, ornt, shape,
        modality=decided, modality_source=source,
    )  # fmt: skip


def read_dicom_series(folder: str | Path) -> Volume:
    """The one series of a DICOM folder, assembled by data_prep in a private temporary cache."""
    from data_prep import prep_archive

    folder = Path(folder)
    if not folder.is_dir():
        raise VolumeError(f"{folder}: DICOM series folder not found")
    with tempfile.TemporaryDirectory(prefix="medmae_series_") as tmp:
        cache = Path(tmp) / "cache"
        summary = prep_archive(
            [folder], cache, workers=1, salt_file=Path(tmp) / "salt", val_fraction=0.0, progress=False
        )
        rows = load_manifest(cache).rows if (cache / "manifest.json").exists() else ()
        volumes = [r for r in rows if r.kind == "volume"] or list(rows)
        if len(volumes) != 1:
            reasons = dict(summary.rejects)
            raise VolumeError(
                f"{folder}: expected exactly one usable DICOM series, data_prep found {len(volumes)} "
                f"(rejected files by reason: {reasons or 'none'})"
            )
        row = volumes[0]
        array = np.array(open_series_array(cache, row, mmap=False))
    return _from_row(folder.name, array, row)


def read_cache_series(cache_dir: str | Path, series_id: str) -> Volume:
    """A series of a medmae cache by its pseudonymous id."""
    rows = {r.series_id: r for r in load_manifest(Path(cache_dir)).rows}
    if series_id not in rows:
        raise VolumeError(f"cache:{series_id}: no such series in the cache {cache_dir}")
    row = rows[series_id]
    array = np.asarray(open_series_array(Path(cache_dir), row, mmap=True))
    return _from_row(series_id, array, row)


def _from_row(name: str, array: np.ndarray, row: ManifestRow) -> Volume:
    """A volume with the geometry, intensity, kind and modality prep recorded for it."""
    return Volume(
        name, array, np.asarray(row.affine, dtype=float), row.intensity, dict(row.stats),
        kind=row.kind, modality=row.modality, modality_source=row.modality_source,
    )  # fmt: skip


def read_image(
    reference: str, *, base: Path | None = None, modality: str | None = None, cache_dir: str | None = None
) -> Volume:
    """Resolve an image reference (NIfTI file, DICOM folder, ``cache:SERIES_ID``) to a :class:`Volume`.

    ``modality`` applies to NIfTI files only (as prep's ``--nifti-modality``): DICOM series and cache
    entries carry their own.
    """
    if reference.startswith("cache:"):
        if not cache_dir:
            raise VolumeError(f"{reference}: a cache reference needs cache_dir to be set")
        return read_cache_series(cache_dir, reference[len("cache:") :])
    path = Path(reference)
    if base is not None and not path.is_absolute():
        path = base / path
    if is_nifti(path):
        return read_nifti_image(path, modality)
    if path.is_dir():
        return read_dicom_series(path)
    raise VolumeError(f"{path}: not found, or neither a NIfTI file nor a DICOM series folder")


def read_label(path: str | Path, image: Volume, num_classes: int) -> np.ndarray:
    """A NIfTI label map on the image's grid, canonical (Z, Y, X) ``uint8``; checks geometry and values."""
    path = Path(path)
    if not is_nifti(path):
        raise VolumeError(f"{path}: labels must be NIfTI files")
    array, affine, *_ = _read_nifti_canonical(path, role="label")
    if array.shape != image.shape:
        raise VolumeError(
            f"{path}: label geometry differs from image {image.name}: shape {list(array.shape)} vs {list(image.shape)}"
        )
    if not np.allclose(affine, image.affine, atol=AFFINE_TOLERANCE_MM):
        worst = float(np.abs(affine - image.affine).max())
        raise VolumeError(
            f"{path}: label geometry differs from image {image.name}: affines differ by up to {worst:.4g} mm"
        )
    if array.dtype.kind == "f":
        if not np.isfinite(array).all() or not np.equal(np.mod(array, 1), 0).all():
            raise VolumeError(f"{path}: label values must be whole numbers")
    values = np.unique(array)
    bad = values[(values < 0) | (values >= num_classes)]
    if bad.size:
        raise VolumeError(
            f"{path}: label values {bad[:10].tolist()} are outside the declared classes 0..{num_classes - 1}"
        )
    return array.astype(np.uint8)


# ----------------------------------------------------------------------------- the rule, carried to prediction


def inputs_record(datamodule: object) -> dict[str, object]:
    """What a fine-tuning checkpoint keeps of how inputs were read (rules, never per-file values):
    the datamodule's ``input_record()``, or prep's own defaults when there is none."""
    record = getattr(datamodule, "input_record", None)
    return dict(record()) if callable(record) else {"nifti_modality": None}


def recorded_modality(inputs: object, where: str) -> str | None:
    """The ``nifti_modality`` rule of a checkpoint's ``inputs`` record (absent in older checkpoints: None)."""
    from data_prep.nifti_meta import is_modality_code

    if inputs is None:
        return None
    if not isinstance(inputs, dict):
        raise ValueError(f"{where}: field 'inputs' must be a mapping, got {type(inputs).__name__}")
    value = inputs.get("nifti_modality")
    if value is None:
        return None
    if not isinstance(value, str) or not is_modality_code(value):
        raise ValueError(f"{where}: field 'inputs.nifti_modality' must be a modality code or null, got {value!r}")
    return value


def add_modality_option(parser: argparse.ArgumentParser) -> None:
    """``--modality`` of the prediction commands (checked by :func:`prediction_modality`)."""
    parser.add_argument(
        "--modality",
        default=None,
        help="modality of NIfTI inputs (CT -> HU windows); default: the rule fine-tuning used (recorded in "
        "the checkpoint), else each file's JSON sidecar, as in prep. One that contradicts either stops.",
    )


def prediction_modality(reference: str, recorded: str | None, requested: str | None) -> str | None:
    """The NIfTI modality option for predicting ``reference``: the checkpoint's rule by default.

    A ``--modality`` that contradicts the checkpoint's rule, or the file's own JSON sidecar, is a
    :class:`VolumeError`: the model would see other intensities than it was fine-tuned on.
    """
    if requested is None:
        return recorded
    if recorded is not None and requested != recorded:
        raise VolumeError(
            f"--modality {requested} contradicts the checkpoint: fine-tuning read every NIfTI as {recorded} "
            f"(leave --modality out to use it)"
        )
    if is_nifti(reference):
        said = nifti_modality_of(reference)[2]
        if said is not None and said != requested:
            raise VolumeError(f"{reference}: --modality {requested} contradicts its JSON sidecar (Modality {said})")
    return requested
