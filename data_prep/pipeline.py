"""The prep run end to end: scan -> assemble -> build (resumable, shardable) -> report -> manifest.

Sharding: every shard scans the whole archive (header-only, cheap next to decoding) so that series
assembly sees every file, then builds only the series whose pseudonym hashes to it and reports
only the rejected files whose pseudonym hashes to it (files dropped while building a series belong
to that series' shard). Each shard writes its sidecars into the shared ``CACHE_DIR`` and a partial
result ``CACHE_DIR/prep_state/shard-i-of-N.json``; :func:`merge_shards` checks that all N are there
with the same salt/settings and writes ``manifest.json`` and ``reject_report.json``.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import tempfile
from collections.abc import Iterable, Sequence
from concurrent.futures import as_completed
from pathlib import Path

from data_prep.build import BuildResult, BuildTask, already_built, build_series
from data_prep.deid import (
    Pseudonymizer,
    default_salt_path,
    is_inside,
    load_or_create_salt,
    shard_of,
    split_of,
)
from data_prep.report import (
    Outcome,
    PrepSummary,
    list_shard_partials,
    read_shard_partial,
    reason_counts,
    total,
    write_reject_report,
    write_shard_partial,
)
from data_prep.scan import ScanRecord, scan_archives
from data_prep.series import assemble
from data_prep.workers import worker_pool
from medmae.data.cache import MANIFEST_NAME, ManifestRow, sidecar_path, write_manifest

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
) -> PrepSummary:
    """Turn DICOM/NIfTI archives into the de-identified training cache at ``out``.

    Args:
        archives: folders to scan recursively (their order is part of the file pseudonyms: keep it).
        out: the cache directory (created if needed).
        workers: processes for header reads and for building series.
        salt_file: secret key of the pseudonyms; default ``<out>.salt`` beside the cache; created if absent.
        val_fraction: share of patients in the ``val`` split, in [0, 1).
        shard: ``(i, N)`` to build only part ``i`` of ``N``; then run :func:`merge_shards`.
        path_map: optional JSON written *outside* the cache mapping pseudonyms to archive paths.
        progress: show tqdm progress bars (stderr).

    Raises:
        PrepError: the arguments cannot work; nothing has been written then.
    """
    archives = [Path(a) for a in archives]
    out = Path(out).absolute()
    _check_arguments(archives, out, workers, val_fraction, shard)
    salt_path = Path(salt_file).absolute() if salt_file is not None else default_salt_path(out)
    if is_inside(salt_path, out):
        raise PrepError(f"the salt file must live outside the cache directory (got {salt_path})")
    if path_map is not None:
        path_map = Path(path_map).absolute()
        if is_inside(path_map, out):
            raise PrepError(f"--path-map must be written outside the cache directory (got {path_map})")
    _ensure_writable(out)
    salt_created = not salt_path.exists()
    try:
        pseudo = Pseudonymizer(load_or_create_salt(salt_path))
    except (OSError, ValueError) as e:
        raise PrepError(str(e)) from e

    records = _scan(archives, out, salt_path, path_map, workers, progress)
    assembly = assemble(records)
    file_ids = {r.rel: (pseudo.directory(r.rel) if r.is_directory else pseudo.file(r.rel)) for r in records}

    def mine(pseudonym: str) -> bool:
        return shard is None or shard_of(pseudonym, shard[1]) == shard[0]

    outcome = Outcome(files_seen=sum(1 for r in records if not r.is_directory))
    for r in records:
        if r.kind == "reject" and mine(file_ids[r.rel]):
            assert r.reason is not None
            outcome.rejects[file_ids[r.rel]] = r.reason
    for rel, reason in assembly.rejects.items():
        if mine(file_ids[rel]):
            outcome.rejects[file_ids[rel]] = reason

    tasks = [
        BuildTask(plan, sid, pseudo.patient(plan.patient_key), {rel: file_ids[rel] for rel in plan.rels}, str(out))
        for plan, sid in ((p, pseudo.series(p.key)) for p in assembly.plans)
        if mine(sid)
    ]
    results = _run_builds(tasks, workers, progress)

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

    if path_map is not None:
        path_map = _write_path_map(path_map, records, file_ids, tasks, results, outcome, shard)

    settings = {
        "salt_fingerprint": pseudo.fingerprint(),
        "val_fraction": float(val_fraction),
        "archives": pseudo.file("\0".join(os.path.realpath(a) for a in archives)),
    }
    manifest_path = report_path = partial = None
    if shard is None:
        report_path = write_reject_report(out, outcome)
        write_manifest(out, outcome.rows, val_fraction)  # last: the manifest means "done"
        manifest_path = out / MANIFEST_NAME
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
    for key in ("salt_fingerprint", "val_fraction", "archives"):
        if len({json.dumps(s.get(key)) for s in settings}) != 1:
            raise PrepError(f"shards disagree on {key!r}: they must share salt file, --val-fraction and archives")
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
    report_path = write_reject_report(cache_dir, merged)
    write_manifest(cache_dir, merged.rows, val_fraction)
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
    )


# ----------------------------------------------------------------------------- steps


def _check_arguments(
    archives: Sequence[Path], out: Path, workers: int, val_fraction: float, shard: tuple[int, int] | None
) -> None:
    if not archives:
        raise PrepError("no archive directory given")
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


def _ensure_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as e:
        raise PrepError(f"cache directory is not writable: {out} ({e.__class__.__name__})") from e


def _scan(
    archives: Sequence[Path], out: Path, salt: Path, path_map: Path | None, workers: int, progress: bool
) -> list[ScanRecord]:
    from tqdm.auto import tqdm

    exclude = [out, salt] + ([path_map] if path_map is not None else [])
    with tqdm(desc="scan", unit="file", disable=not progress, dynamic_ncols=True) as bar:
        return scan_archives(archives, workers=workers, exclude=exclude, on_progress=bar.update)


def _run_builds(tasks: Sequence[BuildTask], workers: int, progress: bool) -> list[BuildResult]:
    """Build all tasks (skipping built ones without leaving the main process); results in task order."""
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

        def finished(i: int, res: BuildResult) -> None:
            nonlocal built
            results[i] = res
            bar.update(1)
            if res.record is not None:
                built += 1
                if kill_after and built >= kill_after:
                    os.kill(os.getpid(), signal.SIGKILL)

        if workers <= 1 or len(todo) <= 1:
            for i in todo:
                finished(i, build_series(tasks[i]))
        else:
            with worker_pool(min(workers, len(todo))) as pool:
                futures = {pool.submit(build_series, tasks[i]): i for i in todo}
                for fut in as_completed(futures):
                    finished(futures[fut], fut.result())
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
    doc = {
        "files": {f: path_of[f] for f in sorted(files) if not f.startswith("d")},
        "directories": {f: path_of[f] for f in sorted(files) if f.startswith("d")},
        "series": dict(sorted(series.items())),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8", errors="surrogateescape") as f:
            json.dump(doc, f, indent=1, sort_keys=True, ensure_ascii=False)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path

