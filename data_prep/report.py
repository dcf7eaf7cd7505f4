"""The reject report, the per-shard partial results, and the end-of-run summary.

Everything here is pseudonymous: files are named by their keyed id, never by path. No timestamps,
sorted keys and sorted lists, so an interrupted-then-resumed run writes the same bytes as a
straight one.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data_prep.build import STATE_DIRNAME
from data_prep.reasons import Reason
from medmae.data.cache import REJECT_REPORT_NAME, ManifestRow, write_json_atomic

REPORT_SCHEMA_VERSION = 1
PARTIAL_SCHEMA_VERSION = 1


@dataclass
class Outcome:
    """What one run (or one shard, or a merge of shards) produced."""

    files_seen: int = 0
    files_in_series: int = 0
    rejects: dict[str, Reason] = field(default_factory=dict)  # file/dir pseudonym -> reason
    rows: list[ManifestRow] = field(default_factory=list)
    series_built: int = 0
    series_skipped: int = 0
    missing: list[str] = field(default_factory=list)  # previous series whose files all left the archive

    @property
    def files_rejected(self) -> int:
        return sum(1 for k in self.rejects if not k.startswith("d"))

    @property
    def directories_unreadable(self) -> int:
        return sum(1 for k, r in self.rejects.items() if k.startswith("d") and r == Reason.UNREADABLE_DIRECTORY)

    @property
    def directory_links_not_followed(self) -> int:
        return sum(1 for k, r in self.rejects.items() if k.startswith("d") and r == Reason.DIRECTORY_LINK)


def reason_counts(rejects: Mapping[str, Reason]) -> dict[str, int]:
    """Counts by reason code, sorted by code (stable JSON and printing)."""
    counts = Counter(Reason(r).value for r in rejects.values())
    return dict(sorted(counts.items()))


def report_json(outcome: Outcome) -> dict[str, Any]:
    """The ``reject_report.json`` document (see docs/data_prep.md for the fields)."""
    return {
        "schema_version": REPORT_SCHEMA_VERSION,
        "files_seen": outcome.files_seen,
        "files_in_built_series": outcome.files_in_series,
        "files_rejected": outcome.files_rejected,
        "directories_unreadable": outcome.directories_unreadable,
        "directory_links_not_followed": outcome.directory_links_not_followed,
        "series_in_manifest": len(outcome.rows),
        "counts": reason_counts(outcome.rejects),
        "rejected": [{"id": k, "reason": Reason(v).value} for k, v in sorted(outcome.rejects.items())],
    }


def write_reject_report(cache_dir: Path, outcome: Outcome) -> Path:
    path = Path(cache_dir) / REJECT_REPORT_NAME
    write_json_atomic(path, report_json(outcome))
    return path


# ----------------------------------------------------------------------------- shard partials


def shard_partial_path(cache_dir: Path, index: int, count: int) -> Path:
    return Path(cache_dir) / STATE_DIRNAME / f"shard-{index:04d}-of-{count:04d}.json"


def write_shard_partial(
    cache_dir: Path, index: int, count: int, outcome: Outcome, settings: Mapping[str, Any]
) -> Path:
    """One shard's share: its manifest rows, its rejects, its counts, and the settings merge checks."""
    path = shard_partial_path(cache_dir, index, count)
    write_json_atomic(
        path,
        {
            "schema_version": PARTIAL_SCHEMA_VERSION,
            "shard": [index, count],
            "settings": dict(settings),
            "files_seen": outcome.files_seen,
            "files_in_built_series": outcome.files_in_series,
            "series_built": outcome.series_built,
            "series_skipped": outcome.series_skipped,
            "rows": [r.to_json() for r in sorted(outcome.rows, key=lambda r: r.series_id)],
            "rejected": [{"id": k, "reason": Reason(v).value} for k, v in sorted(outcome.rejects.items())],
            "missing": sorted(outcome.missing),
        },
    )
    return path


def read_shard_partial(path: Path) -> tuple[tuple[int, int], dict[str, Any], Outcome]:
    """Parse a partial written by :func:`write_shard_partial` (validating every row)."""
    d = json.loads(Path(path).read_text("utf-8"))
    if d.get("schema_version") != PARTIAL_SCHEMA_VERSION:
        raise ValueError(f"{path.name}: unknown schema_version {d.get('schema_version')!r}")
    index, count = (int(x) for x in d["shard"])
    rows = [ManifestRow.from_json(r, where=f"{path.name} rows[{i}]") for i, r in enumerate(d["rows"])]
    outcome = Outcome(
        files_seen=int(d["files_seen"]),
        files_in_series=int(d["files_in_built_series"]),
        rejects={e["id"]: Reason(e["reason"]) for e in d["rejected"]},
        rows=list(rows),  # type: ignore[arg-type]
        series_built=int(d["series_built"]),
        series_skipped=int(d["series_skipped"]),
        missing=[str(s) for s in d.get("missing", [])],  # absent in partials of preps before it
    )
    return (index, count), dict(d["settings"]), outcome


def list_shard_partials(cache_dir: Path) -> list[Path]:
    return sorted((Path(cache_dir) / STATE_DIRNAME).glob("shard-*-of-*.json"))


# ----------------------------------------------------------------------------- summary


@dataclass(frozen=True)
class ManifestChanges:
    """How a new manifest differs from the one it replaced, by series (rows compared whole).

    ``updated`` rows changed (rebuilt from other instances: shape, stats, ...); ``kept_missing`` are
    previous series whose files left the archive and that ``--keep-missing`` kept (also unchanged).
    """

    new: int
    updated: int
    unchanged: int
    removed: int
    kept_missing: int = 0

    @classmethod
    def between(
        cls, previous: Mapping[str, ManifestRow], rows: Iterable[ManifestRow], kept: Iterable[str] = ()
    ) -> ManifestChanges:
        new = updated = unchanged = 0
        ids = set()
        for row in rows:
            ids.add(row.series_id)
            before = previous.get(row.series_id)
            if before is None:
                new += 1
            elif before == row:
                unchanged += 1
            else:
                updated += 1
        return cls(new, updated, unchanged, len(set(previous) - ids), len(set(kept)))

    def format(self) -> str:
        text = (f"  manifest vs previous: {self.new} new, {self.updated} updated, {self.unchanged} unchanged, "
                f"{self.removed} removed")
        if self.kept_missing:
            text += f" ({self.kept_missing} missing from the archive kept: --keep-missing)"
        return text


@dataclass(frozen=True)
class PrepSummary:
    """What ``prep_archive`` (or ``merge``) did; ``format()`` is the text printed at the end.

    ``manifest`` is None for a shard run (the shard writes ``shard_partial`` instead; run merge).
    """

    cache_dir: Path
    files_seen: int
    files_in_series: int
    files_rejected: int
    series_built: int
    series_skipped: int
    rejects: dict[str, int]
    manifest: Path | None
    reject_report: Path | None
    salt_file: Path | None = None
    salt_created: bool = False
    shard: tuple[int, int] | None = None
    shard_partial: Path | None = None
    path_map: Path | None = None
    series_in_manifest: int = 0
    changes: ManifestChanges | None = None  # None for a shard run (merge counts them)
    scan_index: Path | None = None  # written (``scan_only``) or read instead of scanning
    scan_only: bool = False  # --scan-only: series_in_manifest counts the series planned

    def format(self) -> str:
        if self.scan_only:
            return self._format_scan_only()
        lines = []
        head = "medmae prep" + (f" shard {self.shard[0]}/{self.shard[1]}" if self.shard else "")
        lines.append(f"{head}: {self.files_seen} files seen, {self.files_in_series} in built series, "
                     f"{self.files_rejected} rejected")
        lines.append(f"  series built: {self.series_built}, already built (skipped): {self.series_skipped}")
        if self.changes is not None:
            lines.append(self.changes.format())
        if self.rejects:
            lines.append("  rejects by reason:")
            width = max(len(k) for k in self.rejects)
            lines += [f"    {k:<{width}}  {v}" for k, v in self.rejects.items()]
        lines.append(f"  cache:         {_shown(self.cache_dir)}")
        if self.manifest is not None:
            lines.append(f"  manifest:      {_shown(self.manifest)} ({self.series_in_manifest} series)")
        if self.reject_report is not None:
            lines.append(f"  reject report: {_shown(self.reject_report)}")
        if self.shard_partial is not None:
            lines.append(f"  shard result:  {_shown(self.shard_partial)} (run `medmae prep merge "
                         f"{_shown(self.cache_dir)}` when all shards are done)")
        if self.salt_file is not None:
            created = " (created; keep it secret, keep it for reruns)" if self.salt_created else ""
            lines.append(f"  salt:          {_shown(self.salt_file)}{created}")
        if self.path_map is not None:
            lines.append(f"  path map:      {_shown(self.path_map)} (holds archive paths: hospital use only)")
        if self.scan_index is not None:
            lines.append(f"  scan index:    {_shown(self.scan_index)} (read instead of scanning the archives)")
        return "\n".join(lines)

    def _format_scan_only(self) -> str:
        lines = [f"medmae prep --scan-only: {self.files_seen} files seen, {self.series_in_manifest} series "
                 f"planned ({self.files_in_series} files), {self.files_rejected} rejected by the scan and assembly"]
        if self.rejects:
            lines.append("  rejects by reason:")
            width = max(len(k) for k in self.rejects)
            lines += [f"    {k:<{width}}  {v}" for k, v in self.rejects.items()]
        lines.append(f"  cache:         {_shown(self.cache_dir)} (nothing built)")
        if self.salt_file is not None:
            created = " (created; keep it secret, keep it for reruns)" if self.salt_created else ""
            lines.append(f"  salt:          {_shown(self.salt_file)}{created}")
        if self.scan_index is not None:
            lines.append(f"  scan index:    {_shown(self.scan_index)} (holds archive paths and UIDs: keep it "
                         "secret; run the shards with --scan-index, delete it after merge)")
        return "\n".join(lines)


def _shown(path: Path) -> str:
    """A path printable on any terminal: bytes that are not UTF-8 appear as ``\\xNN``."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def total(outcomes: Iterable[Outcome]) -> Outcome:
    """Combine shard outcomes (rows and rejects are disjoint by construction)."""
    out = Outcome()
    for o in outcomes:
        out.files_seen = max(out.files_seen, o.files_seen)
        out.files_in_series += o.files_in_series
        out.rejects.update(o.rejects)
        out.rows.extend(o.rows)
        out.series_built += o.series_built
        out.series_skipped += o.series_skipped
        out.missing.extend(o.missing)
    out.missing.sort()
    return out
