"""Pieces both PACS sources share: the query, the UID file, credentials, and metadata -> ScanRecord
through prep's own header parser (so a pulled header is judged exactly as a file's)."""

from __future__ import annotations

import os
import re
import stat
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data_prep.reasons import Reason
from data_prep.scan import DicomHeader, ScanRecord, dicom_header
from data_prep.sources.base import CREDENTIALS_ENV, PacsError, RetrieveFailed, locator

_UID = re.compile(r"[0-9]+(\.[0-9]+)*")
#: The most bytes a credentials file may hold (a password or a token, not a database).
_MAX_CREDENTIALS = 64 * 1024


@dataclass(frozen=True)
class Query:
    """What to pull: attribute filters (``--query KEY=VALUE``) and, optionally, study/series UIDs."""

    filters: dict[str, str]
    uids: tuple[str, ...] = ()


def parse_query(items: Sequence[str]) -> dict[str, str]:
    """``["Modality=CT", "StudyDate=20240101-20241231"]`` -> filters; keys must be DICOM keywords.

    Raises:
        PacsError: one line naming the item.
    """
    from pydicom.datadict import tag_for_keyword

    filters: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key or not value:
            raise PacsError(f"--query {item!r}: expected KEYWORD=VALUE (e.g. Modality=CT)")
        if tag_for_keyword(key) is None:
            raise PacsError(f"--query {item!r}: {key!r} is not a DICOM keyword")
        if key in filters:
            raise PacsError(f"--query: {key} given twice")
        filters[key] = value
    return filters


def read_uids(path: Path) -> tuple[str, ...]:
    """Study or series UIDs, one a line (blank lines and ``#`` comments ignored).

    Raises:
        PacsError: unreadable file, or a line that is not a UID (named by its number, never shown).
    """
    try:
        text = Path(path).read_text("ascii")
    except (OSError, UnicodeDecodeError) as e:
        raise PacsError(f"--uids file {path} cannot be read ({e.__class__.__name__})") from None
    uids: list[str] = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        if len(line) > 64 or not _UID.fullmatch(line):
            raise PacsError(f"--uids file {path}: line {number} is not a DICOM UID")
        uids.append(line)
    if not uids:
        raise PacsError(f"--uids file {path} holds no UID")
    return tuple(dict.fromkeys(uids))


def read_credentials(path: Path | None) -> str | None:
    """The secret from ``path``, else from ``$MEDMAE_PACS_CREDENTIALS``, else None.

    Never taken from the command line (shell history, ``ps``); a file others can read is refused.

    Raises:
        PacsError: the file is missing, not private, too large or empty.
    """
    if path is None:
        value = os.environ.get(CREDENTIALS_ENV)
        return value.strip() if value and value.strip() else None
    try:
        st = os.stat(path)
    except OSError as e:
        raise PacsError(f"--pacs-credentials {path} cannot be read ({e.__class__.__name__})") from None
    if not stat.S_ISREG(st.st_mode) or st.st_size > _MAX_CREDENTIALS:
        raise PacsError(f"--pacs-credentials {path} is not a small regular file")
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise PacsError(f"--pacs-credentials {path} is readable by other users: chmod 600 it")
    try:
        secret = Path(path).read_text("utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise PacsError(f"--pacs-credentials {path} cannot be read ({e.__class__.__name__})") from None
    if not secret:
        raise PacsError(f"--pacs-credentials {path} is empty")
    return secret


def instance_rel(study: str, series: str, sop: str) -> str:
    """The stable key a pulled instance's pseudonym is derived from (as a file's path in its archive)."""
    return f"0/{study}/{series}/{sop}"


def series_rel(study: str, series: str) -> str:
    return f"0/{study}/{series}"


def header_record(ds: Any, study: str, series: str, max_voxels: int, allow_secondary: bool) -> ScanRecord:
    """One instance's metadata judged by prep's own :func:`~data_prep.scan.dicom_header`."""
    sop = _text(ds.get("SOPInstanceUID"))
    rel, path = instance_rel(study, series, sop), locator(study, series, sop)
    try:
        header = dicom_header(ds, max_voxels, allow_secondary=allow_secondary)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException:  # a header that cannot be understood, as in the file scan
        return ScanRecord(rel, path, "reject", Reason.DICOM_UNREADABLE)
    if isinstance(header, Reason):
        return ScanRecord(rel, path, "reject", header)
    assert isinstance(header, DicomHeader)
    return ScanRecord(rel, path, "dicom", dicom=header)


def series_failure(study: str, series: str, reason: Reason) -> ScanRecord:
    """A series whose metadata could not be read: one record standing for all of it (its instances
    are unknown), counted like an unreadable folder."""
    return ScanRecord(series_rel(study, series), "", "reject", reason, is_directory=True)


def rejected_instances(study: str, series: str, sops: Iterable[str], reason: Reason) -> list[ScanRecord]:
    """Instances refused from the listing alone (a report series): their metadata is never read."""
    return [ScanRecord(instance_rel(study, series, s), locator(study, series, s), "reject", reason)
            for s in sops]


def is_uid(text: str) -> bool:
    return len(text) <= 64 and _UID.fullmatch(text) is not None


def _text(v: Any) -> str:
    if v is None:
        return ""
    if hasattr(v, "value") and not isinstance(v, str | bytes):
        v = v.value
    return str(v).strip().strip("\0").strip()


class SeriesBudget:
    """The per-series time budget of retrieval in one worker (a worker builds one series at a time)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = float(seconds)
        self._series: str | None = None
        self._since = 0.0

    def check(self, series: str) -> None:
        now = time.monotonic()
        if series != self._series:
            self._series, self._since = series, now
        elif now - self._since > self.seconds:
            raise RetrieveFailed(f"the per-series time budget of {self.seconds:g} s is used up")
