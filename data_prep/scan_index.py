"""``--scan-index FILE``: the archive's scan, done once and shared by every shard (issue 20, item 3).

``medmae prep ARCHIVE... --out CACHE --scan-only --scan-index FILE`` scans the archives once and
writes every :class:`~data_prep.scan.ScanRecord` (rejects included) to ``FILE``;
``medmae prep ... --shard i/N --scan-index FILE`` (or a plain run) reads them back instead of
scanning, so each file's header is read once overall and a shard opens only its own series' files.
Series assembly still runs in every shard (it is ~35x cheaper than the scan) from the very records
a scan would have produced, so the cache, shard results, reject report and path map are the bytes
of a run without the index.

The file is JSON Lines, written and read one line at a time (memory stays as in the compact scan:
records read back are interned by :class:`~data_prep.compact.Compactor` like the scan's):

* line 1, a header: format, version, the number of records, and the run settings the scan and the
  assembly depend on, keyed like a shard result's (:data:`INDEX_SETTINGS`): salt fingerprint,
  archives, ``--max-voxels``, ``--follow-links``, ``--nifti-modality``, ``--allow-secondary`` and
  which of the cache / salt / path map lie inside an archive (the scan skips those);
* one JSON array per record (raw paths and UIDs: the file is a secret like the salt);
* a last line ``{"end": MAC}``: an HMAC under the salt of every line before it, so a truncated or
  edited index, or one written with another salt, is refused with one line before anything is built.

The file lives outside the cache and every archive, is written atomically with mode 0600 (the path
map's private writer) and nothing of it is copied into the cache, the logs or the reports.
"""

from __future__ import annotations

import dataclasses
import hmac
import json
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from data_prep.compact import Compactor
from data_prep.deid import Pseudonymizer, is_inside, load_or_create_salt
from data_prep.headers import DicomHeader, FrameInfo
from data_prep.nifti_meta import ModalityRule, NiftiSidecar
from data_prep.path_map import private_text_file
from data_prep.preflight import PrepError
from data_prep.reasons import Reason
from data_prep.report import Outcome, PrepSummary, reason_counts
from data_prep.scan import ScanRecord
from data_prep.series import SeriesPlan
from data_prep.shards import shard_settings
from data_prep.sources import Source

FORMAT = "medmae-scan-index"
VERSION = 1

#: The header's settings a run must share with the index it reads (refused otherwise).
INDEX_SETTINGS = (
    "salt_fingerprint", "archives", "max_voxels", "follow_links", "nifti_modality", "allow_secondary", "excluded",
)
_WHAT = {
    "salt_fingerprint": "another salt (--salt-file)",
    "archives": "other archives (the same folders, in the same order, are needed)",
    "max_voxels": "another --max-voxels",
    "follow_links": "another --follow-links",
    "nifti_modality": "other --nifti-modality rules",
    "allow_secondary": "another --allow-secondary",
    "excluded": "another cache, salt or path map location inside an archive (skipped by the scan)",
}
_HEADER_FIELDS = tuple(f.name for f in dataclasses.fields(DicomHeader))
_FRAME_FIELDS = tuple(f.name for f in dataclasses.fields(FrameInfo))
assert _HEADER_FIELDS[-1] == "frames"


def check_scan_index(
    scan_index: Path | None,
    scan_only: bool,
    out: Path,
    archives: Sequence[Path],
    shard: tuple[int, int] | None,
    source: Source | None,
    salt_path: Path,
    path_map: Path | None,
) -> Path | None:
    """The ``--scan-only`` / ``--scan-index`` arguments, before anything is written -> the index, absolute.

    The index must lie outside the cache and every archive and be neither the salt file nor the
    path map; a run that reads it needs it to exist.
    """
    if scan_index is None:
        if scan_only:
            raise PrepError("--scan-only needs --scan-index FILE (where the scan is written)")
        return None
    if source is not None:
        raise PrepError("--scan-only / --scan-index work on archive folders; a PACS source is not supported")
    if scan_only and shard is not None:
        raise PrepError("--scan-only scans for all shards: run it once without --shard")
    if scan_only and path_map is not None:
        raise PrepError("--path-map is written by the runs that build; --scan-only builds nothing")
    path = Path(scan_index).absolute()
    if is_inside(path, out):
        raise PrepError(f"--scan-index must live outside the cache directory (got {path})")
    for a in archives:
        if is_inside(path, a):
            raise PrepError(f"--scan-index must live outside the archives (got {path}, inside {a})")
    for secret in (salt_path, path_map):
        if secret is not None and os.path.realpath(secret) == os.path.realpath(path):
            raise PrepError(f"--scan-index must not be the salt file or the path map (got {path})")
    if path.exists() and not path.is_file():
        raise PrepError(f"--scan-index is not a regular file: {path}")
    if not scan_only and not path.is_file():
        raise PrepError(f"scan index not found: {path} (write it with `medmae prep ... --scan-only --scan-index`)")
    return path


def index_settings(
    pseudo: Pseudonymizer,
    archives: Sequence[Path],
    max_voxels: int,
    follow_links: bool,
    nifti_rules: Sequence[ModalityRule],
    allow_secondary: bool,
    excluded: Sequence[Path | None],
) -> dict[str, object]:
    """The settings an index records (:data:`INDEX_SETTINGS`), keyed like :func:`shard_settings`'s.

    ``excluded``: what the scan skips (cache, salt, path map); only those inside an archive count.
    """
    s = shard_settings(pseudo, archives, None, 0.0, max_voxels, follow_links, nifti_rules, allow_secondary, False)
    inside = sorted({os.path.realpath(p) for p in excluded if p is not None and any(is_inside(p, a) for a in archives)})
    s["excluded"] = pseudo.file("\0".join(inside))
    return {k: s[k] for k in INDEX_SETTINGS}


def write_scan_index(
    path: Path, records: Sequence[ScanRecord], settings: dict[str, object], pseudo: Pseudonymizer
) -> None:
    """Write ``records`` (sorted by rel, as the scan returns them) to ``path``, one line each, 0600, atomically."""
    mac = pseudo.mac(FORMAT)
    with private_text_file(path) as f:

        def put(line: str) -> None:
            mac.update(line.encode("ascii"))
            f.write(line)

        put(_dumps({"format": FORMAT, "version": VERSION, "records": len(records), "settings": settings}))
        for r in records:
            put(_dumps(_encode(r)))
        f.write(_dumps({"end": mac.hexdigest()}))


def check_index_header(
    path: Path, salt_path: Path, salt_created: bool, settings_of: Callable[[Pseudonymizer], dict[str, object]]
) -> None:
    """Refuse, before anything is written, an index of another salt or other settings (its header
    only; :func:`read_scan_index` checks the whole file). ``settings_of``: this run's settings."""
    if salt_created:
        raise PrepError(f"scan index {path} was written with another salt (--salt-file): {salt_path} does not exist")
    try:
        pseudo = Pseudonymizer(load_or_create_salt(salt_path))
    except (OSError, ValueError) as e:
        raise PrepError(str(e)) from e
    try:
        with open(path, "rb") as f:
            _check_header(_object(_numbered(f, path), path, pseudo.mac(FORMAT)), path, settings_of(pseudo))
    except OSError as e:
        raise PrepError(f"scan index {path} cannot be read ({e.__class__.__name__})") from None


def read_scan_index(path: Path, settings: dict[str, object], pseudo: Pseudonymizer) -> list[ScanRecord]:
    """The records of the index at ``path``, checked against this run's ``settings`` and the salt.

    Raises:
        PrepError: one line naming the file: unreadable, another format, written with other
            settings or another salt, a malformed line, truncated, or edited since it was written.
    """
    rerun = "rerun `medmae prep ... --scan-only`"
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed below; lines are read one at a time
    except OSError as e:
        raise PrepError(f"scan index {path} cannot be read ({e.__class__.__name__})") from None
    with f:
        lines = _numbered(f, path)
        mac = pseudo.mac(FORMAT)
        head = _object(lines, path, mac)
        _check_header(head, path, settings)
        compact = Compactor().record
        records: list[ScanRecord] = []
        end: str | None = None
        for number, raw in lines:
            try:
                doc = json.loads(raw)
                if isinstance(doc, dict):
                    end = str(doc["end"])
                    break
                records.append(compact(_decode(doc)))
            except (ValueError, TypeError, KeyError, IndexError, AttributeError):
                raise PrepError(f"scan index {path}: line {number} is malformed (edited or cut?); {rerun}") from None
            mac.update(raw)
        if end is None:
            raise PrepError(f"scan index {path} is truncated (its end line is missing); {rerun}")
        if not hmac.compare_digest(end, mac.hexdigest()) or head.get("records") != len(records):
            raise PrepError(f"scan index {path} was changed after it was written (its check value does not "
                            f"match); {rerun}")
        if next(lines, None) is not None:
            raise PrepError(f"scan index {path} has lines after its end line (edited?); {rerun}")
    return records


def scan_summary(
    out: Path, salt_path: Path, salt_created: bool, index: Path | None, plans: Sequence[SeriesPlan], outcome: Outcome
) -> PrepSummary:
    """What ``--scan-only`` prints: files seen, series planned (``series_in_manifest``), scan and assembly rejects."""
    return PrepSummary(
        cache_dir=out, files_seen=outcome.files_seen, files_in_series=sum(len(set(p.rels)) for p in plans),
        files_rejected=outcome.files_rejected, series_built=0, series_skipped=0, rejects=reason_counts(outcome.rejects),
        manifest=None, reject_report=None, salt_file=salt_path, salt_created=salt_created, scan_index=index,
        scan_only=True, series_in_manifest=len(plans),
    )


# ----------------------------------------------------------------------------- lines


def _dumps(doc: Any) -> str:
    # ASCII only: a path's undecodable bytes (lone surrogates) and non-ASCII header text come back
    # exactly; NaN is allowed (a rescale may be NaN: the build rejects it, as after a scan)
    return json.dumps(doc, ensure_ascii=True, allow_nan=True, separators=(",", ":")) + "\n"


def _check_header(head: dict, path: Path, settings: dict[str, object]) -> None:
    if head.get("format") != FORMAT or head.get("version") != VERSION:
        raise PrepError(f"scan index {path} is not a medmae scan index of version {VERSION}")
    written = head.get("settings")
    if not isinstance(written, dict):
        raise PrepError(f"scan index {path}: line 1 is malformed; rerun `medmae prep ... --scan-only`")
    for key in INDEX_SETTINGS:
        if written.get(key) != settings[key]:
            raise PrepError(f"scan index {path} was written with {_WHAT[key]} than this run; rerun "
                            "`medmae prep ... --scan-only`")


def _numbered(f: Any, path: Path) -> Iterator[tuple[int, bytes]]:
    try:
        for number, raw in enumerate(f, 1):
            if not raw.endswith(b"\n"):
                raise PrepError(f"scan index {path} is truncated (line {number} is cut); rerun "
                                "`medmae prep ... --scan-only`")
            yield number, raw
    except OSError as e:
        raise PrepError(f"scan index {path} cannot be read ({e.__class__.__name__})") from None


def _object(lines: Iterator[tuple[int, bytes]], path: Path, mac: Any) -> dict:
    found = next(lines, None)
    if found is None:
        raise PrepError(f"scan index {path} is empty")
    try:
        doc = json.loads(found[1])
    except ValueError:
        doc = None
    if not isinstance(doc, dict):
        raise PrepError(f"scan index {path} is not a medmae scan index (line 1 is not its header)")
    mac.update(found[1])
    return doc


def _encode(r: ScanRecord) -> list:
    """A record as a JSON array (tuples become lists; :func:`_decode` turns every list back into one)."""
    sidecar = None
    if r.sidecar is not None:
        s = r.sidecar
        sidecar = [s.modality, s.image_type, s.burned_in, s.problem]
    dicom = None
    if r.dicom is not None:
        h = r.dicom
        dicom = [getattr(h, n) for n in _HEADER_FIELDS[:-1]]
        dicom.append([[getattr(fr, n) for n in _FRAME_FIELDS] for fr in h.frames])
    reason = None if r.reason is None else r.reason.value
    return [r.rel, os.path.abspath(r.path), r.kind, reason, r.is_directory, r.nifti_rel, sidecar, dicom]


def _decode(doc: list) -> ScanRecord:
    rel, path, kind, reason, is_directory, nifti_rel, sidecar, dicom = doc
    if not (isinstance(rel, str) and isinstance(path, str) and isinstance(kind, str)):
        raise TypeError("rel, path and kind are strings")
    header = None
    if dicom is not None:
        *values, frames = dicom
        header = DicomHeader(*map(_tuples, values), frames=tuple(FrameInfo(*map(_tuples, fr)) for fr in frames))
    side = None
    if sidecar is not None:
        modality, image_type, burned_in, problem = sidecar
        side = NiftiSidecar(modality, _tuples(image_type), burned_in, problem)
    return ScanRecord(rel, path, kind, None if reason is None else Reason(reason), header, bool(is_directory),
                      side, nifti_rel)


def _tuples(x: Any) -> Any:
    """JSON lists back to the tuples they were written from (every sequence of a record is a tuple)."""
    return tuple(_tuples(e) for e in x) if type(x) is list else x
