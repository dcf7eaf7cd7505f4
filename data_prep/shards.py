"""Sharded preps: which shard owns what, the settings shards must share, and their merge.

``medmae prep --shard i/N`` builds only the series whose pseudonym hashes to shard ``i`` and
reports only the rejected files whose pseudonym hashes to it (files dropped while building a series
belong to that series' shard); each writes its sidecars into the shared ``CACHE_DIR`` and a partial
result ``CACHE_DIR/prep_state/shard-i-of-N.json`` holding the settings below. :func:`merge_shards`
checks that all N are there with the same salt and settings and publishes their union
(:mod:`data_prep.publish`). The shard's own run is :func:`data_prep.pipeline.prep_archive`.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from data_prep.deid import Pseudonymizer, shard_of
from data_prep.incremental import previous_rows
from data_prep.lock import CacheBusy, cache_lock
from data_prep.nifti_meta import ModalityRule
from data_prep.preflight import PrepError
from data_prep.publish import publish
from data_prep.report import PrepSummary, list_shard_partials, read_shard_partial, reason_counts, total
from data_prep.sources import Source
from data_prep.state import recorded_salt_fingerprints
from medmae.data.cache import MANIFEST_NAME, REJECT_REPORT_NAME, sidecar_path

log = logging.getLogger("data_prep")

#: Settings every shard of one cache must share (merge refuses otherwise).
SHARD_SETTINGS = (
    "salt_fingerprint", "val_fraction", "archives", "max_voxels", "follow_links", "nifti_modality", "allow_secondary",
    "keep_missing",
)


def owner(shard: tuple[int, int] | None) -> Callable[[str], bool]:
    """``mine(pseudonym)``: whether a series or file pseudonym belongs to ``shard`` (all do without one)."""

    def mine(pseudonym: str) -> bool:
        return shard is None or shard_of(pseudonym, shard[1]) == shard[0]

    return mine


def shard_settings(
    pseudo: Pseudonymizer,
    archives: Sequence[Path],
    source: Source | None,
    val_fraction: float,
    max_voxels: int,
    follow_links: bool,
    nifti_rules: Sequence[ModalityRule],
    allow_secondary: bool,
    keep_missing: bool,
) -> dict[str, object]:
    """The settings a shard result records (:data:`SHARD_SETTINGS`); archives and rules keyed, never raw."""
    return {
        "salt_fingerprint": pseudo.fingerprint(),
        "val_fraction": float(val_fraction),
        "archives": pseudo.file(source.describe() if source is not None else
                                "\0".join(os.path.realpath(a) for a in archives)),
        "max_voxels": int(max_voxels),
        "follow_links": bool(follow_links),
        # keyed like the archives: a rule may hold an archive path, and nothing raw enters the cache
        "nifti_modality": pseudo.file("\0".join(r.text for r in nifti_rules)),
        "allow_secondary": bool(allow_secondary),
        "keep_missing": bool(keep_missing),
    }


def merge_shards(cache_dir: Path, shards: int | None = None) -> PrepSummary:
    """Combine the partial results of ``medmae prep --shard i/N`` runs into manifest + reject report.

    Raises:
        PrepError: a shard is missing, shards disagree on salt/settings, or a built series' sidecar
            is missing from ``cache_dir`` (shards must share one cache directory).
    """
    cache_dir = Path(cache_dir).absolute()
    if not cache_dir.is_dir():
        raise PrepError(f"cache directory not found: {cache_dir}")
    try:
        with cache_lock(cache_dir):
            return _merge_locked(cache_dir, shards)
    except CacheBusy as e:
        raise PrepError(str(e)) from e


def _merge_locked(cache_dir: Path, shards: int | None) -> PrepSummary:
    previous = previous_rows(cache_dir)
    parsed = []
    for path in list_shard_partials(cache_dir):
        try:
            parsed.append(read_shard_partial(path))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise PrepError(f"unreadable shard result {path.name} ({e.__class__.__name__}: {e})") from e
    counts = sorted({count for (_, count), _, _ in parsed})
    if not counts:
        raise PrepError(f"no shard results in {cache_dir} (run `medmae prep ... --shard i/N` first)")
    if shards is None:
        if len(counts) > 1:
            raise PrepError(f"shard results for several shard counts {counts}; pass --shards N")
        shards = counts[0]
    parts = {index: (settings, outcome) for (index, count), settings, outcome in parsed if count == shards}
    missing = [i for i in range(shards) if i not in parts]
    if missing:
        raise PrepError(f"missing shard results for shard(s) {missing} of {shards}")
    settings = [parts[i][0] for i in range(shards)]
    for key in SHARD_SETTINGS:
        if len({json.dumps(s.get(key)) for s in settings}) != 1:
            raise PrepError(f"shards disagree on {key!r}: they must share salt file, --val-fraction, archives, "
                            "--max-voxels, --follow-links, --nifti-modality, --allow-secondary and --keep-missing")
    fingerprint = str(settings[0]["salt_fingerprint"])
    recorded = recorded_salt_fingerprints(cache_dir)
    if any(fp != fingerprint for fp in recorded):
        raise PrepError(f"cache {cache_dir} records another salt than its shard results: they do not belong together")
    outcomes = [parts[i][1] for i in range(shards)]
    if len({o.files_seen for o in outcomes}) != 1:
        log.warning("shards saw different numbers of files (the archive changed while they ran?)")
    merged = total(outcomes)
    ids = [r.series_id for r in merged.rows]
    if len(set(ids)) != len(ids):
        raise PrepError("the same series appears in several shard results")
    absent = [sid for sid in ids if not sidecar_path(cache_dir, sid).is_file()]
    if absent:
        raise PrepError(f"{len(absent)} built series have no sidecar in {cache_dir}; shards must share it")
    val_fraction = float(settings[0]["val_fraction"])
    keep_missing = bool(settings[0].get("keep_missing", False))
    changes = publish(cache_dir, merged, previous, keep_missing, val_fraction, fingerprint)
    return PrepSummary(
        cache_dir=cache_dir,
        files_seen=merged.files_seen,
        files_in_series=merged.files_in_series,
        files_rejected=merged.files_rejected,
        series_built=merged.series_built,
        series_skipped=merged.series_skipped,
        rejects=reason_counts(merged.rejects),
        manifest=cache_dir / MANIFEST_NAME,
        reject_report=cache_dir / REJECT_REPORT_NAME,
        series_in_manifest=len(merged.rows),
        changes=changes,
    )
