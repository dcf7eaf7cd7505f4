"""Publishing a run: reject report, then the manifest (the atomic swap), then the removals.

Training reads the manifest, so writing it is the moment a run becomes visible, and it must be one
atomic step after everything it names is on disk. A plain run and a merge of shard results end
here alike. Series that left the manifest are deleted only after the swap; their ids are written to
a journal (:func:`data_prep.state.pending_removal_path`) before it, so a kill between swap and
deletion is finished by the next run. Which series are kept or removed is decided by
:mod:`data_prep.incremental`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

from data_prep.incremental import kept_rows, removed_series
from data_prep.report import ManifestChanges, Outcome, write_reject_report
from data_prep.state import pending_removal_path, read_pending_removals, remove_series
from medmae.data.cache import MANIFEST_NAME, Manifest, ManifestRow, write_json_atomic


def write_prep_manifest(cache_dir: Path, rows: Iterable[ManifestRow], val_fraction: float, fingerprint: str) -> None:
    """``manifest.json`` as :func:`medmae.data.cache.write_manifest` writes it, plus ``salt_fingerprint``
    (a keyed hash of a constant: it tells which salt built the cache and reveals nothing of it)."""
    manifest = Manifest(rows=tuple(sorted(rows, key=lambda r: r.series_id)), val_fraction=float(val_fraction))
    write_json_atomic(Path(cache_dir) / MANIFEST_NAME, {**manifest.to_json(), "salt_fingerprint": fingerprint})


def publish(
    cache_dir: Path,
    outcome: Outcome,
    previous: Mapping[str, ManifestRow],
    keep_missing: bool,
    val_fraction: float,
    fingerprint: str,
) -> ManifestChanges:
    """Write reject report and manifest (the atomic swap that publishes the run), then delete the
    entries of series that left the manifest.

    With ``keep_missing`` the series in ``outcome.missing`` keep their previous row (split
    recomputed) when their entry is intact. The ids to delete are recorded before the manifest is
    swapped, so a kill between swap and deletion is finished by the next run.
    """
    kept = kept_rows(cache_dir, outcome.missing, previous, val_fraction) if keep_missing else []
    outcome.rows.extend(kept)
    pending_path = pending_removal_path(cache_dir)
    removed = removed_series(previous, read_pending_removals(cache_dir), (r.series_id for r in outcome.rows))
    if removed:
        write_json_atomic(pending_path, {"series": removed})
    write_reject_report(cache_dir, outcome)
    write_prep_manifest(cache_dir, outcome.rows, val_fraction, fingerprint)  # the swap: the manifest means "done"
    for sid in removed:
        remove_series(cache_dir, sid)
    pending_path.unlink(missing_ok=True)
    return ManifestChanges.between(previous, outcome.rows, kept={r.series_id for r in kept})
