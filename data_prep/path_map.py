"""``--path-map``: pseudonym -> archive path, for the hospital's own records, never inside the cache.

The cache names files only by their keyed pseudonyms; a site that must trace a rejected file or a
series back to the archive asks for this map, which is the one file a prep writes that holds raw
paths. It is written with mode 0600 outside the cache (checked by :mod:`data_prep.preflight`), and
paths that are not UTF-8 keep their exact bytes as hex.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TextIO

from data_prep.build import BuildResult, BuildTask
from data_prep.report import Outcome


def write_path_map(
    path: Path,
    path_of: Mapping[str, str],
    tasks: Sequence[BuildTask],
    results: Sequence[BuildResult],
    outcome: Outcome,
    shard: tuple[int, int] | None,
) -> Path:
    """Pseudonym -> archive path (``path_of``: file or folder pseudonym -> its absolute path).

    Covers the files this run accounts for; a shard writes its part to ``<stem>.shard-i-of-N<suffix>``.
    """
    if shard is not None:
        path = path.with_name(f"{path.stem}.shard-{shard[0]:04d}-of-{shard[1]:04d}{path.suffix}")
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
    _write_private(path, doc)
    return path


def absolute_paths(pairs: Iterable[tuple[str, str]]) -> dict[str, str]:
    """``(pseudonym, path)`` pairs -> pseudonym -> absolute path (what :func:`write_path_map` reads)."""
    return {pseudonym: os.path.abspath(p) for pseudonym, p in pairs}


def _write_private(path: Path, doc: dict) -> None:
    """Write ``doc`` as JSON readable by its owner only, atomically."""
    with private_text_file(path) as f:  # strict: never an invalid UTF-8 byte
        json.dump(doc, f, indent=1, sort_keys=True, ensure_ascii=False, allow_nan=False)
        f.write("\n")


@contextlib.contextmanager
def private_text_file(path: Path) -> Iterator[TextIO]:
    """A UTF-8 text file readable by its owner only (mode 0600 from its creation), written to a
    temporary file beside ``path`` and moved into place when the block ends without error (else
    removed): a reader never sees half of it. Used for the path map and the scan index."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def path_text(path: str) -> tuple[str, str | None]:
    """A path as JSON-safe text: ``(text, None)`` when its bytes are UTF-8; otherwise the text shows
    each undecodable byte as ``\\xNN`` and the exact bytes come back as hex (``bytes.fromhex``)."""
    raw = os.fsencode(path)
    try:
        return raw.decode("utf-8"), None
    except UnicodeDecodeError:
        return raw.decode("utf-8", "backslashreplace"), raw.hex()
