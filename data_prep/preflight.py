"""Everything a prep refuses before it writes anything: arguments, output folder, salt.

A run that cannot work must fail in its first second with one line, not after an hour of scanning;
and it must not leave half a cache behind. So every check of the arguments, of the places the run
writes to (the cache, the salt file, the path map) and of the salt against the salt the cache was
built with is here, run before the scan, and raises :class:`PrepError`. The lower modules
(:mod:`data_prep.shards`, :mod:`data_prep.pipeline`) import the error from here.
"""

from __future__ import annotations

import logging
import stat
import tempfile
from collections.abc import Sequence
from pathlib import Path

from data_prep.deid import Pseudonymizer, is_inside, load_or_create_salt
from data_prep.nifti_meta import ModalityRule, parse_modality_rule
from data_prep.sources import Source
from data_prep.state import recorded_salt_fingerprints, salt_state_path
from medmae.data.cache import write_json_atomic

log = logging.getLogger("data_prep")


class PrepError(ValueError):
    """Unusable arguments (missing archive, unwritable output, bad shard, salt inside the cache, ...)."""


def check_arguments(
    archives: Sequence[Path], out: Path, workers: int, val_fraction: float, shard: tuple[int, int] | None,
    source: Source | None = None,
) -> None:
    """The archives (or the source), the output folder, ``workers``, ``val_fraction`` and ``shard``."""
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


def check_limits(
    max_voxels: int, decode_timeout: float, series_timeout: float, allow_secondary: bool, keep_missing: bool
) -> None:
    """The size and time limits and the two switches, each named in its message."""
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


def check_outside_paths(out: Path, salt_path: Path, path_map: Path | None) -> tuple[Path | None, bool]:
    """The salt file and the path map must be regular files outside the cache; an existing salt must
    be readable. -> (the path map made absolute, whether the salt file is to be created)."""
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
    return path_map, salt_created


def ensure_writable(out: Path) -> None:
    """Create the cache folder and prove a file can be written in it."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as e:
        raise PrepError(f"cache directory is not writable: {out} ({e.__class__.__name__})") from e


def source_workers(source: Source | None, workers: int, path_map: Path | None) -> int:
    """Build workers for this run: with a PACS source, at most its connection count (each worker
    holds one connection). A path map names files, which a PACS source has none of."""
    if source is None:
        return workers
    if path_map is not None:
        raise PrepError("--path-map maps pseudonyms to archive files; a PACS source has none")
    return min(workers, source.connections)


def open_pseudonymizer(out: Path, salt_path: Path, salt_created: bool) -> Pseudonymizer:
    """The run's pseudonymizer, once its salt is known to be the one the cache was built with; the
    salt's fingerprint is then recorded in the cache (before anything is built with it).

    A salt created by this run next to a cache that records one would orphan every series in it; a
    salt of another fingerprint would too. A cache that records none (an older prep) is only warned about.
    """
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
    return pseudo


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
