"""One builder of the input transforms, from the pretraining datamodule's record or the export card.

``CacheDataModule.preprocessing()`` (``medmae.data.records``: :func:`slice_record` / :func:`volume_record`)
writes every data choice down; the export card keeps that record verbatim as its ``preprocessing``
section. :func:`build_transform` reads either (a card, or the record itself) back into the transform
fine-tuning and inference run: a :class:`~medmae.data.plane_transform.PlanePreprocessor` (2D / 2.5D:
no ``spatial_dims``, or 2) or a :class:`~medmae.data.volume_transform.VolumePreprocessor`
(``spatial_dims: 3``).

Values are read by the record's layout here (:func:`record_field`, :func:`intensity_values`) and
checked by :class:`RecordChecks`: by default with pretraining's own objects (``IntensityRule.checked``,
``SliceNeighbours``, ``VolumeOptions``; a record written by this code), and for records read from disk
with the card's validator, which ``medmae.export`` passes in (``medmae.export.preprocessing_from_card``:
the limits of untrusted input, :class:`~medmae.export.card.CardError` naming the field). This module
imports nothing from ``medmae.export``.

Example::

    pre = build_transform(dm.preprocessing())          # == preprocessing_from_card(load_card(export_dir))
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from medmae.data.index import AXES
from medmae.data.intensity import IntensityRule
from medmae.data.neighbours import SliceNeighbours
from medmae.data.plane_transform import PlanePreprocessor
from medmae.data.transforms import INTERPOLATIONS
from medmae.data.volume import VolumeOptions
from medmae.data.volume_transform import VolumePreprocessor

Transform = PlanePreprocessor | VolumePreprocessor
#: the transform of each ``spatial_dims``
TRANSFORMS: dict[int, type[Transform]] = {2: PlanePreprocessor, 3: VolumePreprocessor}

Check = Callable[[Mapping[str, Any], str], dict[str, Any]]


def _intensity(v: Mapping[str, Any], where: str) -> dict[str, Any]:
    rule = IntensityRule.checked(v["ct_windows"], v["ct_window_mode"], v["inference_window"], v["percentiles"])
    return {
        "ct_windows": rule.ct_windows,
        "ct_window_mode": rule.ct_window_mode,
        "inference_window": rule.ct_inference_window,
        "percentiles": rule.percentiles,
    }


def _plane(v: Mapping[str, Any], where: str) -> dict[str, Any]:
    if v["axis"] not in AXES:
        raise ValueError(f"{where}: axis must be one of {tuple(AXES)}, got {v['axis']!r}")
    size = tuple(v["image_size"])
    if len(size) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size):
        raise ValueError(f"{where}: image_size must be two positive ints, got {v['image_size']!r}")
    if v["interpolation"] not in INTERPOLATIONS or not isinstance(v["antialias"], bool):
        raise ValueError(f"{where}: resize must be one of {INTERPOLATIONS} with antialias true/false")
    rule = SliceNeighbours(tuple(v["slice_offsets"]), v["slice_spacing_mm"], v["slice_interpolation"])
    return {
        "axis": v["axis"],
        "image_size": size,
        "slice_offsets": rule.offsets,
        "interpolation": v["interpolation"],
        "antialias": v["antialias"],
        **_intensity(v, where),
        "slice_spacing_mm": None if rule.spacing_mm is None else float(rule.spacing_mm),
        "slice_interpolation": rule.interpolation,
    }


def _volume(v: Mapping[str, Any], where: str) -> dict[str, Any]:
    grid = VolumeOptions(size=tuple(v["size"]), spacing_mm=tuple(v["spacing_mm"]))
    return {"size": grid.shape, "spacing_mm": grid.spacing, **_intensity(v, where)}


@dataclass(frozen=True)
class RecordChecks:
    """How the values read from a record are checked and normalised into a transform's fields.

    ``intensity`` / ``plane`` / ``volume`` take the values (keyed by the transform's field names) and
    ``where``, and return the transform's keyword arguments; ``error`` is raised for a missing field.
    The default trusts the record's writer and checks with pretraining's own objects.
    """

    error: type[ValueError] = ValueError
    intensity: Check = field(default=_intensity)
    plane: Check = field(default=_plane)
    volume: Check = field(default=_volume)


DEFAULT_CHECKS = RecordChecks()


def record_field(pre: Mapping[str, Any], path: str, where: str, error: type[ValueError] = ValueError) -> Any:
    """The value at the dotted ``path`` of a record (a card's ``preprocessing`` section); ``error``
    naming ``where`` and ``preprocessing.<path>`` when it is missing."""
    node: Any = pre
    for part in path.split("."):
        if not isinstance(node, Mapping) or part not in node:
            raise error(f"{where}: field 'preprocessing.{path}' is missing")
        node = node[part]
    return node


def intensity_values(pre: Mapping[str, Any], where: str, checks: RecordChecks = DEFAULT_CHECKS) -> dict[str, Any]:
    """The checked ``intensity`` section (2D and 3D records share it): the transforms' intensity fields."""
    err = checks.error
    values = {
        "ct_windows": record_field(pre, "intensity.ct.windows_level_width", where, err),
        "ct_window_mode": record_field(pre, "intensity.ct.mode", where, err),
        "inference_window": pre["intensity"]["ct"].get("inference_window", 0),
        "percentiles": record_field(pre, "intensity.other.percentiles", where, err),
    }
    return checks.intensity(values, where)


def build_transform(
    source: Mapping[str, Any], where: str = "record", checks: RecordChecks = DEFAULT_CHECKS
) -> Transform:
    """The input transform of a pretraining record, or of an export card (``source["preprocessing"]``).

    2D / 2.5D records (no ``spatial_dims``, or 2) give a :class:`PlanePreprocessor`, 3D records
    (``spatial_dims: 3``) a :class:`VolumePreprocessor`, both for inputs of kind ``volume``
    (``for_input`` changes it). ``checks.error`` names ``where`` and the field when the record is
    missing or malformed.
    """
    err = checks.error
    pre = source["preprocessing"] if "preprocessing" in source else source
    if not isinstance(pre, Mapping) or not pre:
        raise err(f"{where}: field 'preprocessing' is missing or empty (the encoder was exported without data)")
    dims = pre.get("spatial_dims", 2)
    if isinstance(dims, bool) or dims not in TRANSFORMS:
        raise err(f"{where}: field 'preprocessing.spatial_dims' must be 2 or 3, got {dims!r}")
    if dims == 3:
        return volume_from_record(pre, where, checks)
    return plane_from_record(pre, where, checks)


def plane_from_record(pre: Mapping[str, Any], where: str, checks: RecordChecks = DEFAULT_CHECKS) -> PlanePreprocessor:
    """The 2D / 2.5D half of :func:`build_transform` (``pre``: the record, a card's ``preprocessing``)."""
    err = checks.error
    values = {
        "axis": record_field(pre, "axis", where, err),
        "image_size": record_field(pre, "image_size", where, err),
        "slice_offsets": record_field(pre, "slice_offsets", where, err),
        "interpolation": record_field(pre, "resize.interpolation", where, err),
        "antialias": pre["resize"].get("antialias", True),
        "slice_spacing_mm": pre.get("slice_spacing_mm"),  # absent (older records) or null: index adjacency
        "slice_interpolation": pre.get("slice_interpolation", "nearest"),
    }
    values.update(intensity_values(pre, where, checks))
    return PlanePreprocessor(**checks.plane(values, where))


def volume_from_record(pre: Mapping[str, Any], where: str, checks: RecordChecks = DEFAULT_CHECKS) -> VolumePreprocessor:
    """The 3D half of :func:`build_transform` (``pre``: the record, ``spatial_dims: 3``)."""
    err = checks.error
    values = {
        "size": record_field(pre, "volume.size", where, err),
        "spacing_mm": record_field(pre, "volume.spacing_mm", where, err),
    }
    values.update(intensity_values(pre, where, checks))
    out = VolumePreprocessor(**checks.volume(values, where))
    channels = pre.get("channels", out.channels)
    if channels != out.channels or isinstance(channels, bool):
        raise err(
            f"{where}: field 'preprocessing.channels' is {channels!r} but the intensity section gives {out.channels}"
        )
    return out
