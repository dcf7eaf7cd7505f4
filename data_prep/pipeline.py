"""The prep run end to end: scan -> assemble -> build (resumable, shardable) -> report -> manifest.

Sharding: every shard scans the whole archive (header-only, cheap next to decoding) so that series
assembly sees every file, then builds only the series whose pseudonym hashes to it and reports
only the rejected files whose pseudonym hashes to it (files dropped while building a series belong
to that series' shard). Each shard writes its sidecars into the shared ``CACHE_DIR`` and a partial
result ``CACHE_DIR/prep_state/shard-i-of-N.json``; :func:`merge_shards` checks that all N are there
with the same salt/settings and writes ``manifest.json`` and ``reject_report.json``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import signal
import stat
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

from data_prep.build import (
    STATE_DIRNAME,
    BuildResult,
    BuildTask,
    already_built,
    read_series_state,
    remove_series,
)
from data_prep.deid import (
    Pseudonymizer,
    default_salt_path,
    is_inside,
    load_or_create_salt,
    shard_of,
    split_of,
)
from data_prep.lock import CacheBusy, cache_lock
from data_prep.nifti_meta import ModalityRule, parse_modality_rule
from data_prep.reasons import Reason
from data_prep.report import (
    ManifestChanges,
    Outcome,
    PrepSummary,
    list_shard_partials,
    read_shard_partial,
    reason_counts,
    total,
    write_reject_report,
    write_shard_partial,
)
from data_prep.scan import DEFAULT_MAX_VOXELS, ScanRecord, scan_archives
from data_prep.series import SeriesPlan, assemble
from data_prep.sources import PacsError, Source
from data_prep.workers import DEFAULT_DECODE_TIMEOUT, DEFAULT_SERIES_TIMEOUT, BuildSupervisor
from medmae.data.cache import (
    MANIFEST_NAME,
    REJECT_REPORT_NAME,
    Manifest,
    ManifestRow,
    built_series_ids,
    load_manifest,
    series_array_path,
    sidecar_path,
    write_json_atomic,
)

log = logging.getLogger("data_prep")

#: Test hook: SIGKILL this process after this many series were newly built (kill-and-resume tests).
KILL_AFTER_ENV = "MEDMAE_PREP_KILL_AFTER"


class PrepError(ValueError):
    """Unusable arguments (missing archive, unwritable output, bad shard, salt inside the cache, ...)."""


def prep_archive(
    archives: Sequence[Path],
    out: Path,
    *,
    workers: int = 1,
    salt_file: Path | None = None,
    val_fraction: float = 0.1,
    shard: tuple[int, int] | None = None,
    path_map: Path | None = None,
    progress: bool = True,
    max_voxels: int = DEFAULT_MAX_VOXELS,
    decode_timeout: float = DEFAULT_DECODE_TIMEOUT,
    follow_links: bool = False,
    nifti_modality: Sequence[str] | str = (),
    allow_secondary: bool = False,
    series_timeout: float = DEFAULT_SERIES_TIMEOUT,
    keep_missing: bool = False,
    source: Source | None = None,
) -> PrepSummary:
    """Turn DICOM/NIfTI archives into the de-identified training cache at ``out``.

    A rerun on a grown or changed archive builds only new series and series whose instances
    changed (series fingerprints), rewrites the manifest and deletes the entries of series that
    left it (see ``keep_missing``); the summary counts new / updated / unchanged / removed series.

    Args:
        archives: folders to scan recursively (their order is part of the file pseudonyms: keep it).
        out: the cache directory (created if needed).
        workers: processes for header reads and for building series.
        salt_file: secret key of the pseudonyms; default ``<out>.salt`` beside the cache; created if absent.
        val_fraction: share of patients in the ``val`` split, in [0, 1).
        shard: ``(i, N)`` to build only part ``i`` of ``N``; then run :func:`merge_shards`.
        path_map: optional JSON written *outside* the cache mapping pseudonyms to archive paths.
        progress: show tqdm progress bars (stderr).
        max_voxels: the most voxels a file (first NIfTI volume) or a series may declare; larger ones
            are rejected ``too_large`` before anything is decoded.
        decode_timeout: seconds one file may take to decode before its worker is killed (the file
            is then ``pixel_decode_failed`` and the series is built without it).
        series_timeout: seconds of worker time one series may take over all its attempts (a file
            timed out or crashed costs an attempt); past it the series is rejected ``series_timeout``,
            so a series of many slow or hanging files cannot hold a worker for hours.
        follow_links: follow symbolic links to folders outside the archives (loops are never followed).
        nifti_modality: ``--nifti-modality`` rules, ``"MOD"`` (every NIfTI) or ``"PATTERN=MOD"`` (fnmatch
            on the path in its archive or the absolute path); the first match wins over the JSON
            sidecar's Modality, the BIDS suffix and ``OT``. A single string is one rule.
        allow_secondary: keep secondary captures and DERIVED\\SECONDARY images that do not say
            ``BurnedInAnnotation = NO`` (rejected ``secondary_capture`` by default: burned-in text).
        keep_missing: keep in the manifest (and on disk) the series of the previous manifest whose
            files all disappeared from the archive; by default they are removed from both.
        source: a PACS to pull from instead of folders (``archives`` empty; see
            :func:`data_prep.sources.open_source` and docs/pacs.md); closed when the run ends.

    Raises:
        PrepError: the arguments cannot work, the cache is in use by another prep, or it was built
            with another salt; nothing has been written then.
        BuildWorkerError: a machine problem (disk full) while building; a rerun resumes.
    """
    archives = [Path(a) for a in archives]
    out = Path(out).absolute()
    _check_arguments(archives, out, workers, val_fraction, shard, source)
    if not (isinstance(max_voxels, int) and max_voxels >= 1):
        raise PrepError(f"max_voxels must be a positive integer (got {max_voxels!r})")
    if not (isinstance(decode_timeout, int | float) and decode_timeout > 0):
        raise PrepError(f"decode_timeout must be a positive number of seconds (got {decode_timeout!r})")
    if not (isinstance(series_timeout, int | float) and 0 < series_timeout < float("inf")):
        raise PrepError(f"series_timeout must be a positive number of seconds (got {series_timeout!r})")
    if not isinstance(allow_secondary, bool):
        raise PrepError(f"allow_secondary must be True or False (got {allow_secondary!r})")
    if not isinstance(keep_missing, bool):
        raise PrepError(f"keep_missing must be True or False (got {keep_missing!r})")
    rules = parse_nifti_modality(nifti_modality)
    salt_path = Path(salt_file).absolute() if salt_file is not None else default_salt_path(out)
    if is_inside(salt_path, out):
        raise PrepError(f"the salt file must live outside the cache directory (got {salt_path})")
    if salt_path.exists() and not salt_path.is_file():
        raise PrepError(f"--salt-file is not a regular file: {salt_path}")
    if path_map is not None:
        path_map = Path(path_map).absolute()
        if is_inside(path_map, out):
            raise PrepError(f"--path-map must be written outside the cache directory (got {path_map})")
        if path_map.exists() and not path_map.is_file():
            raise PrepError(f"--path-map is not a regular file: {path_map}")
    salt_created = not salt_path.exists()
    if not salt_created:  # an existing salt must be usable before anything is created
        try:
            load_or_create_salt(salt_path)
        except (OSError, ValueError) as e:
            raise PrepError(str(e)) from e
    workers = _source_workers(source, workers, path_map)
    _ensure_writable(out)
    try:
        lock = cache_lock(out, shard)
        lock.__enter__()
    except CacheBusy as e:
        raise PrepError(str(e)) from e
    try:
        with source if source is not None else contextlib.nullcontext():  # build workers pull through it
            return _prep_locked(
                archives, out, workers, salt_path, salt_created, val_fraction, shard, path_map, progress,
                max_voxels, decode_timeout, follow_links, nifti_rules=rules, allow_secondary=allow_secondary,
                series_timeout=series_timeout, keep_missing=keep_missing, source=source,
            )
    finally:
        lock.__exit__(None, None, None)


def _prep_locked(
    archives: list[Path],
    out: Path,
    workers: int,
    salt_path: Path,
    salt_created: bool,
    val_fraction: float,
    shard: tuple[int, int] | None,
    path_map: Path | None,
    progress: bool,
    max_voxels: int,
    decode_timeout: float,
    follow_links: bool,
    *,
    nifti_rules: Sequence[ModalityRule],
    allow_secondary: bool,
    series_timeout: float,
    keep_missing: bool = False,
    source: Source | None = None,
) -> PrepSummary:
    recorded = recorded_salt_fingerprints(out)
    if salt_created and recorded:
        raise PrepError(
            f"cache {out} was built with a salt that is not at {salt_path}: pass the --salt-file it was "
            "built with (or use a new --out); a new salt would orphan every series in it"
        )
    try:
        pseudo = Pseudonymizer(load_or_create_salt(salt_path))
    except (OSError, ValueError) as e:
        raise PrepError(str(e)) from e
    fingerprint = pseudo.fingerprint()
    if any(fp != fingerprint for fp in recorded):
        raise PrepError(
            f"cache {out} was built with another salt (fingerprint {sorted(set(recorded))[0]}, this salt's is "
            f"{fingerprint}): pass the --salt-file it was built with, or use a new --out"
        )
    if not recorded and any((out / "series").glob("*.json")):
        log.warning("cache %s records no salt fingerprint (built by an older medmae prep): the salt is not checked",
                    out)
    _warn_if_exposed(salt_path)
    write_json_atomic(salt_state_path(out), {"salt_fingerprint": fingerprint})
    previous = previous_rows(out)  # what training sees until this run swaps the manifest

    records = _scan(archives, out, salt_path, path_map, workers, progress, max_voxels, follow_links, allow_secondary,
                    source)
    assembly = assemble(records, nifti_rules)
    file_ids = {r.rel: (pseudo.directory(r.rel) if r.is_directory else pseudo.file(r.rel)) for r in records}
    plans = []
    for plan in assembly.plans:  # a series too large as a whole (each file fitted): rejected unbuilt
        if plan.rows * plan.columns * len(plan.slices) > max_voxels:
            assembly.rejects.update({rel: Reason.TOO_LARGE for rel in plan.rels})
        else:
            plans.append(plan)

    def mine(pseudonym: str) -> bool:
        return shard is None or shard_of(pseudonym, shard[1]) == shard[0]

    for rel, message in assembly.warnings:
        if mine(file_ids[rel]):
            log.warning("file %s: %s", file_ids[rel], message)

    outcome = Outcome(files_seen=sum(1 for r in records if not r.is_directory))
    for r in records:
        if r.kind == "reject" and mine(file_ids[r.rel]):
            assert r.reason is not None
            outcome.rejects[file_ids[r.rel]] = r.reason
    for rel, reason in assembly.rejects.items():
        if mine(file_ids[rel]):
            outcome.rejects[file_ids[rel]] = reason

    sop_of = {r.rel: r.dicom.sop_instance for r in records if r.dicom is not None}
    tasks = []
    for plan in plans:
        sid = pseudo.series(plan.key)
        if mine(sid):
            version, memo = series_fingerprint(plan, sid, out, pseudo, sop_of)
            tasks.append(BuildTask(plan, sid, pseudo.patient(plan.patient_key),
                                   {rel: file_ids[rel] for rel in plan.rels}, str(out), version, memo))
    results = _run_builds(tasks, workers, progress, decode_timeout, series_timeout)

    in_series: set[str] = set()
    for task, res in zip(tasks, results, strict=True):
        outcome.rejects.update(res.rejects)
        if res.record is None:
            continue
        in_series.update(f for f in task.file_ids.values() if f not in res.rejects)
        outcome.rows.append(ManifestRow.from_record(res.record, split_of(res.record.patient_id, val_fraction)))
        if res.skipped:
            outcome.series_skipped += 1
        else:
            outcome.series_built += 1
    outcome.files_in_series = len(in_series)
    outcome.missing = missing_series(out, previous, outcome.rows, tasks, set(file_ids.values()), mine)

    if path_map is not None:
        path_map = _write_path_map(path_map, records, file_ids, tasks, results, outcome, shard)

    settings = {
        "salt_fingerprint": fingerprint,
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
    manifest_path = report_path = partial = changes = None
    if shard is None:
        changes = _finish(out, outcome, previous, keep_missing, val_fraction, fingerprint)
        manifest_path, report_path = out / MANIFEST_NAME, out / REJECT_REPORT_NAME
        orphans = set(built_series_ids(out)) - {r.series_id for r in outcome.rows}
        if orphans:
            log.warning("%d series in %s are not in this run's manifest (built from other archives or settings); "
                        "training ignores them", len(orphans), out)
    else:
        partial = write_shard_partial(out, shard[0], shard[1], outcome, settings)
    return PrepSummary(
        cache_dir=out,
        files_seen=outcome.files_seen,
        files_in_series=outcome.files_in_series,
        files_rejected=outcome.files_rejected,
        series_built=outcome.series_built,
        series_skipped=outcome.series_skipped,
        rejects=reason_counts(outcome.rejects),
        manifest=manifest_path,
        reject_report=report_path,
        salt_file=salt_path,
        salt_created=salt_created,
        shard=shard,
        shard_partial=partial,
        path_map=path_map,
        series_in_manifest=len(outcome.rows),
        changes=changes,
    )


def salt_state_path(cache_dir: Path) -> Path:
    """Where a run records its salt's fingerprint before building anything."""
    return Path(cache_dir) / STATE_DIRNAME / "salt.json"


def recorded_salt_fingerprints(cache_dir: Path) -> list[str]:
    """Salt fingerprints the cache already records (manifest, run state); unreadable ones count as none."""
    found = []
    for path in (Path(cache_dir) / MANIFEST_NAME, salt_state_path(cache_dir)):
        try:
            fp = json.loads(path.read_text("utf-8")).get("salt_fingerprint")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(fp, str) and fp:
            found.append(fp)
    return found


def write_prep_manifest(cache_dir: Path, rows: Iterable[ManifestRow], val_fraction: float, fingerprint: str) -> None:
    """``manifest.json`` as :func:`medmae.data.cache.write_manifest` writes it, plus ``salt_fingerprint``
    (a keyed hash of a constant: it tells which salt built the cache and reveals nothing of it)."""
    manifest = Manifest(rows=tuple(sorted(rows, key=lambda r: r.series_id)), val_fraction=float(val_fraction))
    write_json_atomic(Path(cache_dir) / MANIFEST_NAME, {**manifest.to_json(), "salt_fingerprint": fingerprint})


# ----------------------------------------------------------------------------- incremental reruns

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


def pending_removal_path(cache_dir: Path) -> Path:
    """Series ids to delete once the new manifest is in place (kept until they are deleted)."""
    return Path(cache_dir) / STATE_DIRNAME / "pending_removal.json"


def _finish(
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
    kept: list[ManifestRow] = []
    if keep_missing:
        for sid in outcome.missing:
            row = previous.get(sid)  # None: shard results older than the manifest now published
            if row is None:
                continue
            if sidecar_path(cache_dir, sid).is_file() and (cache_dir / series_array_path(sid)).is_file():
                kept.append(dataclasses.replace(row, split=split_of(row.patient_id, val_fraction)))
            else:
                log.warning("series %s is missing from the archive and its cache entry is gone: removed", sid)
        outcome.rows.extend(kept)
    new_ids = {r.series_id for r in outcome.rows}
    pending_path = pending_removal_path(cache_dir)
    try:
        pending = {str(s) for s in json.loads(pending_path.read_text("utf-8"))["series"]}
    except (OSError, ValueError, KeyError, TypeError):
        pending = set()
    removed = sorted((set(previous) | pending) - new_ids)
    if removed:
        write_json_atomic(pending_path, {"series": removed})
    write_reject_report(cache_dir, outcome)
    write_prep_manifest(cache_dir, outcome.rows, val_fraction, fingerprint)  # the swap: the manifest means "done"
    for sid in removed:
        remove_series(cache_dir, sid)
    pending_path.unlink(missing_ok=True)
    return ManifestChanges.between(previous, outcome.rows, kept={r.series_id for r in kept})


def _warn_if_exposed(salt_path: Path) -> None:
    try:
        mode = salt_path.stat().st_mode
    except OSError:
        return
    if mode & (stat.S_IROTH | stat.S_IWOTH):
        log.warning(
            "salt file %s is readable by every user (mode %o): anyone who reads it can link the cache's "
            "pseudonyms back to archive ids; run `chmod 600 %s`", salt_path, stat.S_IMODE(mode), salt_path
        )


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


#: Settings every shard of one cache must share (merge refuses otherwise).
_SHARD_SETTINGS = (
    "salt_fingerprint", "val_fraction", "archives", "max_voxels", "follow_links", "nifti_modality", "allow_secondary",
    "keep_missing",
)


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
    for key in _SHARD_SETTINGS:
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
    changes = _finish(cache_dir, merged, previous, keep_missing, val_fraction, fingerprint)
    report_path = cache_dir / REJECT_REPORT_NAME
    return PrepSummary(
        cache_dir=cache_dir,
        files_seen=merged.files_seen,
        files_in_series=merged.files_in_series,
        files_rejected=merged.files_rejected,
        series_built=merged.series_built,
        series_skipped=merged.series_skipped,
        rejects=reason_counts(merged.rejects),
        manifest=cache_dir / MANIFEST_NAME,
        reject_report=report_path,
        series_in_manifest=len(merged.rows),
        changes=changes,
    )


# ----------------------------------------------------------------------------- steps


def _check_arguments(
    archives: Sequence[Path], out: Path, workers: int, val_fraction: float, shard: tuple[int, int] | None,
    source: Source | None = None,
) -> None:
    if not archives and source is None:
        raise PrepError("no archive directory given")
    if archives and source is not None:
        raise PrepError("give archive folders or one PACS source, not both")
    for a in archives:
        if not a.exists():
            raise PrepError(f"archive not found: {a}")
        if not a.is_dir():
            raise PrepError(f"archive is not a directory: {a}")
        if is_inside(a, out):
            raise PrepError(f"archive {a} lies inside the cache directory {out}")
    if not (isinstance(workers, int) and workers >= 1):
        raise PrepError(f"workers must be a positive integer (got {workers!r})")
    if not 0.0 <= float(val_fraction) < 1.0:
        raise PrepError(f"val_fraction must be in [0, 1) (got {val_fraction!r})")
    if shard is not None:
        i, n = shard
        if not (isinstance(i, int) and isinstance(n, int) and n >= 1 and 0 <= i < n):
            raise PrepError(f"shard must be i/N with 0 <= i < N (got {i}/{n})")
    if out.exists() and not out.is_dir():
        raise PrepError(f"--out exists and is not a directory: {out}")


def parse_nifti_modality(rules: Sequence[str] | str) -> list[ModalityRule]:
    """``--nifti-modality`` rules, validated; a single string is one rule.

    Raises:
        PrepError: one line naming the option and the rule.
    """
    texts = [rules] if isinstance(rules, str) else list(rules)
    parsed = []
    for text in texts:
        if not isinstance(text, str):
            raise PrepError(f"--nifti-modality: a rule must be a string (got {text!r})")
        try:
            parsed.append(parse_modality_rule(text))
        except ValueError as e:
            raise PrepError(f"--nifti-modality {text!r}: {e}") from e
    return parsed


def _ensure_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as e:
        raise PrepError(f"cache directory is not writable: {out} ({e.__class__.__name__})") from e


def _scan(
    archives: Sequence[Path],
    out: Path,
    salt: Path,
    path_map: Path | None,
    workers: int,
    progress: bool,
    max_voxels: int,
    follow_links: bool,
    allow_secondary: bool,
    source: Source | None = None,
) -> list[ScanRecord]:
    from tqdm.auto import tqdm

    exclude = [out, salt] + ([path_map] if path_map is not None else [])
    with tqdm(desc="scan", unit="file", disable=not progress, dynamic_ncols=True) as bar:
        if source is not None:  # metadata only: nothing is retrieved before series pass the checks
            try:
                return sorted(source.scan(max_voxels=max_voxels, allow_secondary=allow_secondary,
                                          on_progress=bar.update), key=lambda r: r.rel)
            except PacsError as e:
                raise PrepError(str(e)) from None
        return scan_archives(archives, workers=workers, exclude=exclude, on_progress=bar.update,
                             max_voxels=max_voxels, follow_links=follow_links, allow_secondary=allow_secondary)


def _source_workers(source: Source | None, workers: int, path_map: Path | None) -> int:
    """Build workers for this run: with a PACS source, at most its connection count (each worker
    holds one connection). A path map names files, which a PACS source has none of."""
    if source is None:
        return workers
    if path_map is not None:
        raise PrepError("--path-map maps pseudonyms to archive files; a PACS source has none")
    return min(workers, source.connections)


def _run_builds(
    tasks: Sequence[BuildTask], workers: int, progress: bool, decode_timeout: float, series_timeout: float
) -> list[BuildResult]:
    """Build all tasks in supervised worker processes (see :class:`BuildSupervisor`); results in task order.

    Series already built are found without starting a worker. Files dropped on the way are logged
    with their pseudonym and cause.
    """
    from tqdm.auto import tqdm

    kill_after = int(os.environ.get(KILL_AFTER_ENV, "0") or 0)
    results: list[BuildResult | None] = [None] * len(tasks)
    todo: list[int] = []
    for i, task in enumerate(tasks):
        done = already_built(task)
        if done is None:
            todo.append(i)
        else:
            results[i] = done
    todo.sort(key=lambda i: -len(tasks[i].plan.slices))  # big series first: better load balance
    built = 0
    with tqdm(total=len(todo), desc="build", unit="series", disable=not progress, dynamic_ncols=True) as bar:

        def finished(k: int, res: BuildResult) -> None:
            nonlocal built
            results[todo[k]] = res
            bar.update(1)
            for file_id, cause in sorted(res.causes.items()):
                reason = res.rejects.get(file_id, Reason.BUILD_FAILED)
                log.warning("series %s: file %s -> %s (%s)", res.series_id, file_id, reason.value, cause)
            if res.record is not None:
                built += 1
                if kill_after and built >= kill_after:
                    os.kill(os.getpid(), signal.SIGKILL)

        def give_up(k: int, excluded: Mapping[str, str], cause: str, reason: Reason) -> None:
            task = tasks[todo[k]]
            fid = task.file_ids
            rejects = {fid[rel]: reason for rel in task.plan.rels}
            causes = {fid[rel]: cause for rel in task.plan.rels}
            for rel, why in excluded.items():
                rejects[fid[rel]], causes[fid[rel]] = Reason.PIXEL_DECODE_FAILED, why
            finished(k, BuildResult(task.series_id, None, rejects, causes=causes))

        if todo:
            supervisor = BuildSupervisor(min(workers, len(todo)), decode_timeout, series_timeout)
            supervisor.run([tasks[i] for i in todo], finished, give_up)
    assert all(r is not None for r in results)
    return results  # type: ignore[return-value]


def _write_path_map(
    path: Path,
    records: Iterable[ScanRecord],
    file_ids: dict[str, str],
    tasks: Sequence[BuildTask],
    results: Sequence[BuildResult],
    outcome: Outcome,
    shard: tuple[int, int] | None,
) -> Path:
    """Pseudonym -> archive path, for the hospital's own records (mode 0600, never inside the cache).

    Covers the files this run accounts for; a shard writes its part to ``<stem>.shard-i-of-N<suffix>``.
    """
    if shard is not None:
        path = path.with_name(f"{path.stem}.shard-{shard[0]:04d}-of-{shard[1]:04d}{path.suffix}")
    path_of = {file_ids[r.rel]: os.path.abspath(r.path) for r in records}
    series = {res.series_id: sorted(t.file_ids.values()) for t, res in zip(tasks, results, strict=True)}
    files = {f for fs in series.values() for f in fs} | set(outcome.rejects)
    raw_paths: dict[str, str] = {}

    def text(f: str) -> str:
        shown, raw_hex = path_text(path_of[f])
        if raw_hex is not None:
            raw_paths[f] = raw_hex
        return shown

    doc = {
        "files": {f: text(f) for f in sorted(files) if not f.startswith("d")},
        "directories": {f: text(f) for f in sorted(files) if f.startswith("d")},
        "series": dict(sorted(series.items())),
    }
    doc["raw_paths"] = dict(sorted(raw_paths.items()))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:  # strict: never an invalid UTF-8 byte
            json.dump(doc, f, indent=1, sort_keys=True, ensure_ascii=False, allow_nan=False)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def path_text(path: str) -> tuple[str, str | None]:
    """A path as JSON-safe text: ``(text, None)`` when its bytes are UTF-8; otherwise the text shows
    each undecodable byte as ``\\xNN`` and the exact bytes come back as hex (``bytes.fromhex``)."""
    raw = os.fsencode(path)
    try:
        return raw.decode("utf-8"), None
    except UnicodeDecodeError:
        return raw.decode("utf-8", "backslashreplace"), raw.hex()

