"""The prep's own bookkeeping inside the cache: ``CACHE_DIR/prep_state/``.

One module says where every state file lives and how it is read, so that the build (which writes a
series' state), the incremental rerun logic (which reads it to decide what changed), the salt check
and the publishing step (the journal of pending removals) agree on it without importing each other.
Everything here is pseudonymous (series / file pseudonyms, keyed hashes); the reader of the cache
(:mod:`medmae.data.cache`) ignores the folder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from data_prep.reasons import Reason
from medmae.data.cache import MANIFEST_NAME, series_array_path, sidecar_path

#: data_prep's own bookkeeping inside the cache (pseudonymous only; the reader ignores it).
STATE_DIRNAME = "prep_state"


def dropped_state_path(cache_dir: Path, series_id: str) -> Path:
    """Where preps before series fingerprints kept dropped files (read by none; removed on rebuild)."""
    return Path(cache_dir) / STATE_DIRNAME / "dropped" / f"{series_id}.json"


def series_state_path(cache_dir: Path, series_id: str) -> Path:
    """The build state of one series: fingerprint, files, dropped files (pseudonymous only)."""
    return Path(cache_dir) / STATE_DIRNAME / "series" / f"{series_id}.json"


def salt_state_path(cache_dir: Path) -> Path:
    """Where a run records its salt's fingerprint before building anything."""
    return Path(cache_dir) / STATE_DIRNAME / "salt.json"


def pending_removal_path(cache_dir: Path) -> Path:
    """Series ids to delete once the new manifest is in place (kept until they are deleted)."""
    return Path(cache_dir) / STATE_DIRNAME / "pending_removal.json"


@dataclass(frozen=True)
class SeriesState:
    """What the state file of a built series says (see :mod:`data_prep.build`)."""

    fingerprint: str
    files: tuple[str, ...]  # pseudonyms of the plan's files (decides "missing from the archive")
    dropped: dict[str, Reason]
    content_memo: dict[str, str] | None = None


def read_series_state(cache_dir: Path, series_id: str) -> SeriesState | None:
    """The series' state, or None when absent or unreadable (the series then counts as not built)."""
    try:
        d = json.loads(series_state_path(cache_dir, series_id).read_text("utf-8"))
        memo = d.get("content_memo")
        return SeriesState(
            fingerprint=str(d["fingerprint"]),
            files=tuple(str(f) for f in d["files"]),
            dropped={str(k): Reason(v) for k, v in d["dropped"].items()},
            content_memo=None if memo is None else {str(k): str(v) for k, v in memo.items()},
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def remove_series(cache_dir: Path, series_id: str) -> None:
    """Delete a series' cache entry and its bookkeeping (sidecar first: the entry stops being "built")."""
    cache = Path(cache_dir)
    for path in (
        sidecar_path(cache, series_id),
        cache / series_array_path(series_id),
        series_state_path(cache, series_id),
        dropped_state_path(cache, series_id),
    ):
        path.unlink(missing_ok=True)


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


def read_pending_removals(cache_dir: Path) -> set[str]:
    """The series ids a killed run recorded for deletion and did not delete (none when unreadable)."""
    try:
        return {str(s) for s in json.loads(pending_removal_path(cache_dir).read_text("utf-8"))["series"]}
    except (OSError, ValueError, KeyError, TypeError):
        return set()
