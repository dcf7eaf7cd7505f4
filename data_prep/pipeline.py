"""The prep run end to end: scan -> assemble -> build (resumable, shardable) -> report -> manifest.

:func:`prep_archive` checks everything it can before writing (:mod:`data_prep.preflight`), takes the
cache's lock and runs :func:`_prep_locked`, a sequence of named steps: open the salt, read the
previous manifest, scan, assemble and account the scan's rejects, make one build task per series
(with its fingerprint, :mod:`data_prep.incremental`), build, account the builds, find the series
that left the archive, write the path map, and publish (:mod:`data_prep.publish`) or, for a
``--shard i/N``, write the shard's partial result (:mod:`data_prep.shards`, which also merges them).

Sharding: every shard assembles the records of the whole archive (scanned, or read from the scan
index that ``--scan-only`` wrote once: :mod:`data_prep.scan_index`), then builds only the series
whose pseudonym hashes to it and reports only the rejected files whose pseudonym hashes to it.

The names that lived here before the split (issue 19) are still importable from here.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from data_prep import scan_index as index_file
from data_prep.build import BuildResult, BuildTask, already_built
from data_prep.compact import Compactor
from data_prep.deid import Pseudonymizer, default_salt_path, split_of
from data_prep.incremental import (  # noqa: F401 - FINGERPRINT_SCHEME re-exported
    FINGERPRINT_SCHEME,
    missing_series,
    previous_rows,
    series_fingerprint,
)
from data_prep.lock import CacheBusy, cache_lock
from data_prep.nifti_meta import ModalityRule
from data_prep.path_map import absolute_paths, path_text, write_path_map  # noqa: F401 - path_text re-exported
from data_prep.preflight import (  # noqa: F401 - parse_nifti_modality re-exported
    PrepError,
    check_arguments,
    check_limits,
    check_outside_paths,
    ensure_writable,
    open_pseudonymizer,
    parse_nifti_modality,
    source_workers,
)
from data_prep.publish import publish, write_prep_manifest  # noqa: F401 - write_prep_manifest re-exported
from data_prep.reasons import Reason
from data_prep.report import ManifestChanges, Outcome, PrepSummary, reason_counts, write_shard_partial
from data_prep.scan import DEFAULT_MAX_VOXELS, ScanRecord, scan_archives
from data_prep.series import SeriesPlan, assemble
from data_prep.shards import SHARD_SETTINGS, merge_shards, owner, shard_settings  # noqa: F401 - re-exported
from data_prep.sources import PacsError, Source
from data_prep.state import (  # noqa: F401 - re-exported: these lived here before the split
    pending_removal_path,
    recorded_salt_fingerprints,
    remove_series,
    salt_state_path,
)
from data_prep.workers import DEFAULT_DECODE_TIMEOUT, DEFAULT_SERIES_TIMEOUT, BuildSupervisor
from medmae.data.cache import MANIFEST_NAME, REJECT_REPORT_NAME, ManifestRow, built_series_ids

log = logging.getLogger("data_prep")

#: Test hook: SIGKILL this process after this many series were newly built (kill-and-resume tests).
KILL_AFTER_ENV = "MEDMAE_PREP_KILL_AFTER"


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
    scan_only: bool = False,
    scan_index: Path | None = None,
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
        scan_only: only scan the archives and write the records to ``scan_index``; nothing is built.
        scan_index: the scan index (a secret: raw paths and UIDs; outside the cache and the archives),
            written with ``scan_only``, else read instead of scanning (:mod:`data_prep.scan_index`).

    Raises:
        PrepError: the arguments cannot work, the cache is in use by another prep, or it was built
            with another salt; nothing has been written then.
        BuildWorkerError: a machine problem (disk full) while building; a rerun resumes.
    """
    archives = [Path(a) for a in archives]
    out = Path(out).absolute()
    check_arguments(archives, out, workers, val_fraction, shard, source)
    check_limits(max_voxels, decode_timeout, series_timeout, allow_secondary, keep_missing)
    rules = parse_nifti_modality(nifti_modality)
    salt_path = Path(salt_file).absolute() if salt_file is not None else default_salt_path(out)
    path_map, salt_created = check_outside_paths(out, salt_path, path_map)
    scan_index = index_file.check_scan_index(scan_index, scan_only, out, archives, shard, source, salt_path, path_map)
    workers = source_workers(source, workers, path_map)
    run = _Run(
        archives, out, workers, salt_path, salt_created, float(val_fraction), shard, path_map, progress, max_voxels,
        decode_timeout, follow_links, rules, allow_secondary, series_timeout, keep_missing, source,
        scan_only, scan_index,
    )
    if scan_index is not None and not scan_only:  # another salt or settings: refused before writing
        index_file.check_index_header(scan_index, salt_path, salt_created, run.scan_settings)
    ensure_writable(out)
    try:
        lock = cache_lock(out, shard)
        lock.__enter__()
    except CacheBusy as e:
        raise PrepError(str(e)) from e
    try:
        with source if source is not None else contextlib.nullcontext():  # build workers pull through it
            return _prep_locked(run)
    finally:
        lock.__exit__(None, None, None)


@dataclass(frozen=True)
class _Run:
    """The checked arguments of one run (see :func:`prep_archive`)."""

    archives: list[Path]
    out: Path
    workers: int
    salt_path: Path
    salt_created: bool
    val_fraction: float
    shard: tuple[int, int] | None
    path_map: Path | None
    progress: bool
    max_voxels: int
    decode_timeout: float
    follow_links: bool
    nifti_rules: Sequence[ModalityRule]
    allow_secondary: bool
    series_timeout: float
    keep_missing: bool
    source: Source | None
    scan_only: bool = False
    scan_index: Path | None = None

    def scan_settings(self, pseudo: Pseudonymizer) -> dict[str, object]:
        """The settings a scan index records and is checked against (:mod:`data_prep.scan_index`)."""
        return index_file.index_settings(pseudo, self.archives, self.max_voxels, self.follow_links, self.nifti_rules,
                                         self.allow_secondary, [self.out, self.salt_path, self.path_map])


def _prep_locked(run: _Run) -> PrepSummary:
    """The run, once its arguments are checked and the cache is locked: one named step per line."""
    pseudo = open_pseudonymizer(run.out, run.salt_path, run.salt_created)
    if run.scan_only:
        return _scan_only(run, pseudo)
    previous = previous_rows(run.out)  # what training sees until this run swaps the manifest
    mine = owner(run.shard)
    if run.scan_index is None:
        records = _scan(run)
    else:  # the scan the --scan-only run wrote: this run scans nothing
        records = index_file.read_scan_index(run.scan_index, run.scan_settings(pseudo), pseudo)
    file_ids = _file_ids(records, pseudo)
    plans, outcome = _assemble(records, file_ids, run, mine)
    tasks = _build_tasks(plans, records, file_ids, pseudo, run.out, mine)
    path_of = absolute_paths((file_ids[r.rel], r.path) for r in records) if run.path_map is not None else {}
    del records, plans  # the builds need only their tasks: the scan's headers go before the workers fork
    results = _run_builds(tasks, run.workers, run.progress, run.decode_timeout, run.series_timeout)
    _account_builds(outcome, tasks, results, run.val_fraction)
    outcome.missing = missing_series(run.out, previous, outcome.rows, tasks, set(file_ids.values()), mine)
    path_map = None
    if run.path_map is not None:
        path_map = write_path_map(run.path_map, path_of, tasks, results, outcome, run.shard)
    return _finish(run, pseudo, outcome, previous, path_map)


# ----------------------------------------------------------------------------- steps


def _scan(run: _Run) -> list[ScanRecord]:
    """One record per file of the archives (or per instance of the PACS source), sorted by rel."""
    from tqdm.auto import tqdm

    exclude = [run.out, run.salt_path] + ([run.path_map] if run.path_map is not None else [])
    with tqdm(desc="scan", unit="file", disable=not run.progress, dynamic_ncols=True) as bar:
        if run.source is not None:  # metadata only: nothing is retrieved before series pass the checks
            try:
                found = run.source.scan(max_voxels=run.max_voxels, allow_secondary=run.allow_secondary,
                                        on_progress=bar.update)
                return sorted(map(Compactor().record, found), key=lambda r: r.rel)
            except PacsError as e:
                raise PrepError(str(e)) from None
        return scan_archives(run.archives, workers=run.workers, exclude=exclude, on_progress=bar.update,
                             max_voxels=run.max_voxels, follow_links=run.follow_links,
                             allow_secondary=run.allow_secondary)


def _scan_only(run: _Run, pseudo: Pseudonymizer) -> PrepSummary:
    """``--scan-only``: scan once, write the index, and count what the scan and the assembly found."""
    records = _scan(run)
    index_file.write_scan_index(run.scan_index, records, run.scan_settings(pseudo), pseudo)  # type: ignore[arg-type]
    plans, outcome = _assemble(records, _file_ids(records, pseudo), run, owner(None))
    return index_file.scan_summary(run.out, run.salt_path, run.salt_created, run.scan_index, plans, outcome)


def _file_ids(records: Sequence[ScanRecord], pseudo: Pseudonymizer) -> dict[str, str]:
    """rel -> the file's (or unreadable folder's) pseudonym."""
    return {r.rel: (pseudo.directory(r.rel) if r.is_directory else pseudo.file(r.rel)) for r in records}


def _assemble(
    records: Sequence[ScanRecord], file_ids: Mapping[str, str], run: _Run, mine: Callable[[str], bool]
) -> tuple[list[SeriesPlan], Outcome]:
    """Series assembly, and this shard's share of the files rejected by the scan or the assembly.

    A series too large as a whole (each of its files fitted) is rejected unbuilt, ``too_large``.
    """
    assembly = assemble(records, run.nifti_rules)
    plans = []
    for plan in assembly.plans:
        if plan.rows * plan.columns * len(plan.slices) > run.max_voxels:
            assembly.rejects.update({rel: Reason.TOO_LARGE for rel in plan.rels})
        else:
            plans.append(plan)
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
    return plans, outcome


def _build_tasks(
    plans: Sequence[SeriesPlan],
    records: Sequence[ScanRecord],
    file_ids: Mapping[str, str],
    pseudo: Pseudonymizer,
    out: Path,
    mine: Callable[[str], bool],
) -> list[BuildTask]:
    """One task per series of this shard, with its pseudonyms and its fingerprint."""
    sop_of = {r.rel: r.dicom.sop_instance for r in records if r.dicom is not None}
    tasks = []
    for plan in plans:
        sid = pseudo.series(plan.key)
        if mine(sid):
            version, memo = series_fingerprint(plan, sid, out, pseudo, sop_of)
            tasks.append(BuildTask(plan, sid, pseudo.patient(plan.patient_key),
                                   {rel: file_ids[rel] for rel in plan.rels}, str(out), version, memo))
    return tasks


def _account_builds(
    outcome: Outcome, tasks: Sequence[BuildTask], results: Sequence[BuildResult], val_fraction: float
) -> None:
    """Manifest rows, files dropped while building, built / skipped counts and files in series."""
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


def _finish(
    run: _Run, pseudo: Pseudonymizer, outcome: Outcome, previous: Mapping[str, ManifestRow], path_map: Path | None
) -> PrepSummary:
    """Publish the run (manifest, reject report, removals), or write this shard's partial result."""
    fingerprint = pseudo.fingerprint()
    manifest_path = report_path = partial = None
    changes: ManifestChanges | None = None
    if run.shard is None:
        changes = publish(run.out, outcome, previous, run.keep_missing, run.val_fraction, fingerprint)
        manifest_path, report_path = run.out / MANIFEST_NAME, run.out / REJECT_REPORT_NAME
        orphans = set(built_series_ids(run.out)) - {r.series_id for r in outcome.rows}
        if orphans:
            log.warning("%d series in %s are not in this run's manifest (built from other archives or settings); "
                        "training ignores them", len(orphans), run.out)
    else:
        settings = shard_settings(pseudo, run.archives, run.source, run.val_fraction, run.max_voxels,
                                  run.follow_links, run.nifti_rules, run.allow_secondary, run.keep_missing)
        partial = write_shard_partial(run.out, run.shard[0], run.shard[1], outcome, settings)
    return PrepSummary(
        cache_dir=run.out,
        files_seen=outcome.files_seen,
        files_in_series=outcome.files_in_series,
        files_rejected=outcome.files_rejected,
        series_built=outcome.series_built,
        series_skipped=outcome.series_skipped,
        rejects=reason_counts(outcome.rejects),
        manifest=manifest_path,
        reject_report=report_path,
        salt_file=run.salt_path,
        salt_created=run.salt_created,
        shard=run.shard,
        shard_partial=partial,
        path_map=path_map,
        series_in_manifest=len(outcome.rows),
        changes=changes,
        scan_index=run.scan_index,
    )


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
