"""Incremental reruns: what changed in the archive since the manifest now in the cache.

A monthly rerun on a grown archive must build only the series that are new or whose instances
changed, keep the rest, and take out of the manifest the series whose files all left the archive.
Three decisions make that, and they live here together because they must agree with each other:

* a series' *fingerprint* (:func:`series_fingerprint`): a keyed hash of everything its build reads;
  a built series whose state records the same fingerprint is skipped (:func:`data_prep.build.already_built`);
* the *previous* manifest's rows (:func:`previous_rows`): what training sees until the run publishes;
* the series *missing* from the archive (:func:`missing_series`), kept with ``--keep-missing``
  (:func:`kept_rows`) or removed (:func:`removed_series`, through the journal of pending removals
  that :mod:`data_prep.publish` keeps).

The new / updated / unchanged / removed counts of the summary are
:meth:`data_prep.report.ManifestChanges.between` the previous rows and the published ones.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from data_prep.build import BuildTask
from data_prep.deid import Pseudonymizer, split_of
from data_prep.series import SeriesPlan
from data_prep.state import read_series_state
from medmae.data.cache import MANIFEST_NAME, ManifestRow, load_manifest, series_array_path, sidecar_path

log = logging.getLogger("data_prep")

#: Bumped when the fingerprint's inputs change: every series is then rebuilt once.
FINGERPRINT_SCHEME = "medmae-series-v1"


def series_fingerprint(
    plan: SeriesPlan,
    series_id: str,
    cache_dir: Path,
    pseudo: Pseudonymizer,
    sop_of: Mapping[str, str],
) -> tuple[str, dict[str, str] | None]:
    """-> (the series' keyed fingerprint, the NIfTI content memo to store with it, or None).

    The fingerprint covers everything the build reads from the plan: every slice's file (by its
    path in the archive), frame, position and rescale, the series-wide decisions (modality,
    intensity, matrix, photometric, ...) and each DICOM file's SOPInstanceUID, or a NIfTI's
    content (a keyed hash of its bytes). A series whose instances were added, removed or replaced
    gets another fingerprint and is rebuilt. Keyed with the salt (HMAC), it reveals no UID or path.

    A NIfTI's bytes are hashed only when its keyed (device, inode, size, mtime, ctime) differ from
    the ones stored with the last build, so an unchanged NIfTI archive is not read again.
    """
    slices = tuple(dataclasses.replace(s, path="") for s in plan.slices)  # the absolute path may move
    # modality_source changes no array: a sidecar that only lacks it is updated, not rebuilt
    parts = [FINGERPRINT_SCHEME, repr(dataclasses.replace(plan, slices=slices, modality_source=""))]
    memo: dict[str, str] | None = None
    if plan.source == "nifti":
        path = plan.slices[0].path
        content = "unreadable"  # the build then fails and nothing is stored
        try:
            st = os.stat(path)
        except OSError:
            pass
        else:
            stat_key = pseudo.series_version(
                f"stat\0{st.st_dev}\0{st.st_ino}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}"
            )
            state = read_series_state(cache_dir, series_id)
            known = state.content_memo if state is not None else None
            if known is not None and known.get("stat") == stat_key and known.get("content"):
                content = known["content"]
                memo = {"stat": stat_key, "content": content}
            else:
                try:
                    content = pseudo.content(path)
                except OSError:
                    pass
                else:
                    memo = {"stat": stat_key, "content": content}
        parts.append(content)
    else:
        parts += (f"{s.rel}\0{s.frame}\0{sop_of.get(s.rel, '')}" for s in plan.slices)
    return pseudo.series_version("\0".join(parts)), memo


def previous_rows(cache_dir: Path) -> dict[str, ManifestRow]:
    """The rows of the manifest now in the cache (what a training run started now would read), by id.

    An absent manifest is an empty one; an unreadable one too, with a warning (its series are then
    reported as new).
    """
    if not (Path(cache_dir) / MANIFEST_NAME).is_file():
        return {}
    try:
        return {r.series_id: r for r in load_manifest(cache_dir).rows}
    except (OSError, ValueError) as e:
        log.warning("previous manifest of %s unreadable (%s): every series counts as new", cache_dir,
                    e.__class__.__name__)
        return {}


def missing_series(
    cache_dir: Path,
    previous: Mapping[str, ManifestRow],
    rows: Iterable[ManifestRow],
    tasks: Iterable[BuildTask],
    current_files: set[str],
    mine: Callable[[str], bool],
) -> list[str]:
    """Series of the previous manifest (this shard's share) whose files all left the archive.

    A series that is still planned, or one of whose recorded files is still in the archive (now
    rejected, say), is not missing: it is simply not built any more. A series built by a prep that
    recorded no file list is missing when it is not planned.
    """
    present = {r.series_id for r in rows} | {t.series_id for t in tasks}
    missing = []
    for sid in sorted(previous):
        if sid in present or not mine(sid):
            continue
        state = read_series_state(cache_dir, sid)
        if state is not None and any(f in current_files for f in state.files):
            continue
        missing.append(sid)
    return missing


def kept_rows(
    cache_dir: Path, missing: Iterable[str], previous: Mapping[str, ManifestRow], val_fraction: float
) -> list[ManifestRow]:
    """``--keep-missing``: the previous rows of the missing series whose cache entry is intact (split
    recomputed for this run's ``val_fraction``); the others are removed, with a warning."""
    kept: list[ManifestRow] = []
    for sid in missing:
        row = previous.get(sid)  # None: shard results older than the manifest now published
        if row is None:
            continue
        if sidecar_path(cache_dir, sid).is_file() and (cache_dir / series_array_path(sid)).is_file():
            kept.append(dataclasses.replace(row, split=split_of(row.patient_id, val_fraction)))
        else:
            log.warning("series %s is missing from the archive and its cache entry is gone: removed", sid)
    return kept


def removed_series(previous: Iterable[str], pending: Iterable[str], published: Iterable[str]) -> list[str]:
    """Series to delete: those of the previous manifest, or of a killed run's journal of pending
    removals, that the manifest about to be published does not hold."""
    return sorted((set(previous) | set(pending)) - set(published))
