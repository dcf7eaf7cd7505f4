"""De-identification: keyed pseudonyms, the salt that keys them, and silencing chatty libraries.

Pseudonyms are HMAC-SHA256 of the raw identifier under a secret salt kept *outside* the cache, so
the cache alone cannot be linked back to a patient, yet reruns (and every shard) with the same salt
produce the same ids — which is what makes resume and merge deterministic.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import os
import secrets
import warnings
from collections.abc import Iterator
from pathlib import Path

#: Bytes of randomness in a newly created salt (stored as hex text).
SALT_BYTES = 32
_HEX_CHARS = 20  # 80-bit ids: collision-free for any realistic archive


class SaltError(ValueError):
    """The salt file is unusable (empty, inside the cache, unreadable)."""


def default_salt_path(cache_dir: Path) -> Path:
    """Sibling of the cache: ``/data/cache`` -> ``/data/cache.salt`` (never inside the cache)."""
    cache_dir = Path(cache_dir).absolute()
    return cache_dir.parent / f"{cache_dir.name}.salt"


def is_inside(path: Path, directory: Path) -> bool:
    """True when ``path`` is ``directory`` or lies below it (symlinks resolved)."""
    p = Path(os.path.realpath(path))
    d = Path(os.path.realpath(directory))
    return p == d or d in p.parents


def load_or_create_salt(path: Path) -> bytes:
    """Read the salt, or create it (``os.urandom``, mode 0600) if absent.

    Creation is race-free for shards starting together: the salt is written to a private temporary
    file and hard-linked into place, so exactly one writer wins and everyone reads that one.
    """
    path = Path(path)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w", encoding="ascii") as f:
                f.write(os.urandom(SALT_BYTES).hex() + "\n")
                f.flush()
                os.fsync(f.fileno())
            with contextlib.suppress(FileExistsError):
                os.link(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    try:
        key = path.read_bytes().strip()
    except OSError as e:
        raise SaltError(f"cannot read salt file {path} ({e.__class__.__name__})") from e
    if len(key) < 16:
        raise SaltError(f"salt file {path} holds fewer than 16 bytes; delete it or use another --salt-file")
    return key


class Pseudonymizer:
    """Maps raw identifiers (IDs, UIDs, archive paths) to short keyed hashes.

    Each kind of id has its own domain string so that, say, a patient id and a file path that happen
    to be equal never get the same pseudonym.
    """

    def __init__(self, key: bytes) -> None:
        self._key = bytes(key)

    def _hash(self, domain: str, raw: str) -> str:
        msg = domain.encode("ascii") + b"\0" + os.fsencode(raw)
        return hmac.new(self._key, msg, hashlib.sha256).hexdigest()[:_HEX_CHARS]

    def patient(self, raw: str) -> str:
        return "p" + self._hash("patient", raw)

    def series(self, raw: str) -> str:
        return "s" + self._hash("series", raw)

    def file(self, raw: str) -> str:
        return "f" + self._hash("file", raw)

    def directory(self, raw: str) -> str:
        return "d" + self._hash("directory", raw)

    def fingerprint(self) -> str:
        """A public check value of the salt: shards are merged only when theirs agree."""
        return self._hash("salt-fingerprint", "medmae")

    def series_version(self, raw: str) -> str:
        """Keyed fingerprint of what a series is built from (its plan, instance UIDs, file contents):
        it changes when they do and, keyed like the pseudonyms, reveals none of them."""
        return "v" + hmac.new(self._key, b"series-version\0" + os.fsencode(raw), hashlib.sha256).hexdigest()

    def mac(self, domain: str) -> hmac.HMAC:
        """A keyed HMAC-SHA256 to feed piece by piece (a file's integrity check under the salt)."""
        return hmac.new(self._key, domain.encode("ascii") + b"\0", hashlib.sha256)

    def content(self, path: str, chunk: int = 1 << 20) -> str:
        """Keyed hash of a file's bytes (a NIfTI's content identity), read in chunks."""
        mac = hmac.new(self._key, b"file-content\0", hashlib.sha256)
        with open(path, "rb") as f:
            while block := f.read(chunk):
                mac.update(block)
        return "c" + mac.hexdigest()


def split_of(patient_id: str, val_fraction: float) -> str:
    """Deterministic patient-level split: the same pseudonym always lands in the same split.

    The pseudonym is already keyed, so an unkeyed hash of it is uniform and reproducible.
    """
    u = int(hashlib.sha256(patient_id.encode("ascii")).hexdigest()[:15], 16) / float(16**15)
    return "val" if u < val_fraction else "train"


def shard_of(pseudonym: str, n_shards: int) -> int:
    """Which of ``n_shards`` owns a series / a rejected file (uniform over the keyed hash)."""
    return int(pseudonym[1:], 16) % n_shards


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    """Silence pydicom/nibabel warnings and log records for the duration of a read.

    Their messages quote header values ("Invalid value for VR PN: 'DOE^JOHN'") or full paths, which
    must never reach a log. Our own log lines name files by pseudonym instead.
    """
    from pydicom import config as dcm_config

    # Child loggers (pydicom.pixels.decoders.base, nibabel.global) propagate to their parents'
    # handlers regardless of the parents' ``disabled`` flag, so cut propagation and handlers too.
    loggers = [logging.getLogger(name) for name in ("pydicom", "nibabel")]
    saved = [(lg.disabled, lg.propagate, lg.handlers[:]) for lg in loggers]
    mode = dcm_config.settings._reading_validation_mode
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for lg in loggers:
            lg.disabled, lg.propagate, lg.handlers = True, False, [logging.NullHandler()]
        dcm_config.settings.reading_validation_mode = dcm_config.IGNORE
        try:
            yield
        finally:
            dcm_config.settings._reading_validation_mode = mode
            for lg, (disabled, propagate, handlers) in zip(loggers, saved, strict=True):
                lg.disabled, lg.propagate, lg.handlers = disabled, propagate, handlers
