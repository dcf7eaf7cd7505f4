"""One split of the cache at setup: select, drop unreadable entries, index, and say why when none is left.

:func:`index_split` selects the split's rows (``data.selection``, ``data.slice_spacing_mm``, or
``data.volume``), drops those whose array does not open (:func:`verify_entries`), counts every drop by
reason and builds the index the sampler draws from; when a split the run needs ends up empty,
:func:`no_usable_data` names the options that dropped its series (:func:`drop_options`).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

from medmae.data.cache import CacheEntryError, ManifestRow, check_series_array
from medmae.data.index import Selection, SliceIndex, select_series
from medmae.data.options import SamplingOptions, SelectionOptions
from medmae.data.volume import VolumeIndex, VolumeOptions, select_volumes

logger = logging.getLogger(__name__)


class NoUsableDataError(RuntimeError):
    """After filtering and dropping unreadable entries, a split the run needs has no slices left."""


def verify_entries(cache_dir: Path, rows: Sequence[ManifestRow]) -> tuple[tuple[ManifestRow, ...], Counter[str]]:
    """Keep the rows whose array opens and matches its record (header read only); count the others."""
    ok: list[ManifestRow] = []
    dropped: Counter[str] = Counter()
    for row in rows:
        try:
            check_series_array(cache_dir, row)
        except CacheEntryError as e:
            dropped[e.reason] += 1
            logger.debug("dropping cache entry %s at setup: %s", row.series_id, e.reason)
        else:
            ok.append(row)
    return tuple(ok), dropped


def verified(
    cache_dir: Path, split: str, rows: Sequence[ManifestRow], dropped: Counter[str]
) -> tuple[ManifestRow, ...]:
    """:func:`verify_entries`, with a warning that counts the unreadable entries (added to ``dropped``)."""
    kept, unreadable = verify_entries(cache_dir, rows)
    if unreadable:
        logger.warning(
            "%s split: dropped %d unreadable cache entries at setup (%s)",
            split,
            sum(unreadable.values()),
            ", ".join(f"{k}: {v}" for k, v in sorted(unreadable.items())),
        )
    dropped.update(unreadable)
    return kept


def no_usable_data(
    cache_dir: Path, what: str, total: int, dropped: Mapping[str, int], options: Mapping[str, str]
) -> NoUsableDataError:
    """The one-line error of an empty training split; ``options``: drop reason -> the option (and value) behind it."""
    named = [options[r] for r in sorted(dropped) if r in options]
    hint = f"dropped by {', '.join(named)}" if named else "check the cache's reject report (medmae prep)"
    return NoUsableDataError(
        f"data.cache_dir {cache_dir}: no usable training {what} ({total} train series, dropped "
        f"{dict(sorted(dropped.items())) or 'none'}); {hint}"
    )


def select_rows(
    rows: Sequence[ManifestRow],
    split: str,
    *,
    axis: str,
    selection: SelectionOptions,
    spacing_mm: float | None,
    volume: VolumeOptions | None,
) -> Selection:
    """The rows of ``split`` the run can use: by ``selection`` for slices, by ``volume`` for 3D samples."""
    modalities = None if selection.modalities is None else list(selection.modalities)
    if volume is not None:
        return select_volumes(rows, split=split, options=volume, modalities=modalities)
    return select_series(
        rows,
        split=split,
        axis=axis,
        modalities=modalities,
        min_size=selection.min_size,
        min_slices=selection.min_slices,
        include_images=selection.include_images,
        max_anisotropy=selection.max_anisotropy,
        slice_spacing_mm=spacing_mm,
    )


def index_split(
    cache_dir: Path,
    rows: Sequence[ManifestRow],
    split: str,
    *,
    axis: str,
    selection: SelectionOptions,
    sampling: SamplingOptions,
    spacing_mm: float | None,
    volume: VolumeOptions | None,
    verify: bool,
) -> tuple[SliceIndex | VolumeIndex, Counter[str], int]:
    """The split's index, its drop counts by reason, and how many series the split had before any drop."""
    chosen = select_rows(rows, split, axis=axis, selection=selection, spacing_mm=spacing_mm, volume=volume)
    if chosen.dropped.get("slice_spacing"):
        logger.info(
            "%s split: %d series coarser than data.slice_spacing_mm=%g along the %s axis (or single images) "
            "are not used",
            split, chosen.dropped["slice_spacing"], spacing_mm, axis,
        )  # fmt: skip
    kept, dropped = chosen.rows, Counter(chosen.dropped)
    total = len(chosen.rows) + sum(chosen.dropped.values())
    if verify:
        kept = verified(cache_dir, split, kept, dropped)
    alpha = sampling.sampling_alpha
    index = VolumeIndex(kept, volume, alpha) if volume is not None else SliceIndex(kept, axis, alpha)
    return index, dropped, total


def drop_options(selection: SelectionOptions, spacing_mm: float | None, volume: bool) -> dict[str, str]:
    """Drop reason -> the option (and its value) that drops series for it, for the empty-split error."""
    modalities = None if selection.modalities is None else list(selection.modalities)
    return {
        "modality": f"data.selection.modalities={modalities}",
        "image": (
            "3D samples (data.volume) use volumes only"
            if volume
            else f"data.selection.include_images={selection.include_images}"
        ),
        "min_size": f"data.selection.min_size={selection.min_size}",
        "min_slices": f"data.selection.min_slices={selection.min_slices}",
        "anisotropy": f"data.selection.max_anisotropy={selection.max_anisotropy}",
        "slice_spacing": f"data.slice_spacing_mm={spacing_mm}",
        "volume_anisotropy": "data.volume.max_anisotropy",
        "volume_coverage": "data.volume.min_coverage (and size x spacing_mm)",
    }


def split_report(index: SliceIndex | VolumeIndex, dropped: Mapping[str, int]) -> dict[str, object]:
    """What ``setup_report[split]`` holds: the index's counts and the drops by reason."""
    return {**index.describe(), "dropped": dict(sorted(dropped.items()))}


def training_data(index: SliceIndex | VolumeIndex, dropped: Mapping[str, int]) -> dict[str, object]:
    """The card's ``training_data``: counts (never ids) of the training series actually used."""
    return {
        "split": "train",
        "after": "every selection filter and the setup check of unreadable entries",
        **index.composition(),
        "dropped": dict(sorted(dropped.items())),
    }
