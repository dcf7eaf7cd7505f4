"""What every PACS source shares: the interface prep calls, errors without patient data, the rate
limit, and the one hook through which build workers read an instance.

Prep's own code does the rest. A source only answers two questions: *which instances are there and
what do their headers say* (:meth:`Source.scan`, metadata only, turned into prep's
:class:`~data_prep.scan.ScanRecord` by prep's own :func:`~data_prep.scan.dicom_header`) and *give me
the bytes of this instance* (:meth:`Source.retrieve`, called from the build worker through
:func:`open_instance`). Files on disk are the default of that hook: a path that is not a source
locator is opened as a file, as prep always did.

Standard library only: :mod:`data_prep.decode` imports this module in every build worker.
"""

from __future__ import annotations

import io
import multiprocessing
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import IO, Any

#: Prefix of a ``ScanRecord.path`` that names an instance of the active source, not a file:
#: ``pacs-instance:<study uid>/<series uid>/<sop instance uid>``. Never logged (it holds UIDs).
LOCATOR_PREFIX = "pacs-instance:"

#: Conservative defaults for a clinical network (docs/pacs.md).
DEFAULT_CONNECTIONS = 2
DEFAULT_RATE = 20.0  # requests per second, all processes together
DEFAULT_TIMEOUT = 30.0  # seconds per request (connect and read)
DEFAULT_RETRIES = 3  # further tries after a timeout, a refused connection, 429 or 5xx
DEFAULT_BACKOFF = 0.5  # seconds; doubles each try
DEFAULT_SERIES_BUDGET = 600.0  # seconds one series' retrieval may take in a worker

#: Environment variable holding the PACS credentials when no ``--pacs-credentials`` file is given.
CREDENTIALS_ENV = "MEDMAE_PACS_CREDENTIALS"


class PacsError(Exception):
    """A PACS problem as one line naming the server (URL / AE title), never patient data or UIDs."""


class PacsUnreachable(PacsError):
    """The server did not answer (refused, timed out, TLS failure) after every retry."""


class PacsRefused(PacsError):
    """The server answered with an error: credentials refused, a query it rejects, a 4xx/5xx."""


class RetrieveFailed(PacsError):
    """An instance of a series that passed the checks could not be pulled. ``reason`` is the reject
    code (``pacs_retrieve_failed`` or ``pacs_unreachable``); the whole series is left for the next run."""

    def __init__(self, message: str, reason: str = "pacs_retrieve_failed") -> None:
        super().__init__(message)
        self.reason = reason


class RateLimiter:
    """At most ``per_second`` requests per second over this process and the build workers it forks.

    The next free slot lives in shared memory (created before the workers are forked), so the limit
    holds for the run as a whole, not per worker. ``CLOCK_MONOTONIC`` is system-wide on Linux.
    """

    def __init__(self, per_second: float) -> None:
        if not per_second > 0:
            raise ValueError(f"the request rate must be positive (got {per_second!r})")
        self.interval = 1.0 / float(per_second)
        self._next = multiprocessing.get_context("fork").Value("d", 0.0)

    def wait(self) -> None:
        with self._next.get_lock():
            now = time.monotonic()
            slot = max(now, self._next.value)
            self._next.value = slot + self.interval
        if slot > now:
            time.sleep(slot - now)


class Source(ABC):
    """A place prep reads DICOM instances from instead of a folder."""

    #: Build workers (= connections during retrieval) this source allows at most.
    connections: int = DEFAULT_CONNECTIONS

    @abstractmethod
    def describe(self) -> str:
        """The server as logs may show it (URL without credentials, or AE title and address)."""

    @abstractmethod
    def scan(self, *, max_voxels: int, allow_secondary: bool, on_progress: Callable[[int], None] | None = None
             ) -> list[Any]:
        """Query the server and read the metadata of every matching instance -> ``ScanRecord`` list.

        Nothing but headers is transferred; a series whose metadata cannot be read is one record
        standing for the whole series (``is_directory``, reason ``pacs_unreachable`` /
        ``pacs_retrieve_failed``), like an unreadable folder.

        Raises:
            PacsError: the query itself failed (server unreachable, credentials refused).
        """

    @abstractmethod
    def retrieve(self, locator: str) -> bytes:
        """The instance's DICOM bytes (Part 10), in memory.

        Raises:
            RetrieveFailed: after the retries, or past the per-series time budget.
        """

    def close(self) -> None:  # noqa: B027 - optional: a source without connections has nothing to release
        """Release connections; called by prep when the run ends, however it ends."""

    # -- registry used by build workers (inherited through fork)

    def __enter__(self) -> Source:
        global _ACTIVE
        _ACTIVE = self
        return self

    def __exit__(self, *exc: object) -> None:
        global _ACTIVE
        _ACTIVE = None
        self.close()


_ACTIVE: Source | None = None


class _InMemoryInstance(io.BytesIO):
    """A retrieved instance. It stays readable after ``with`` ends, as a file stays openable: pydicom
    reads deferred elements (the pixel data) after the header parse, from the same object."""

    def close(self) -> None:  # the bytes go with the object; nothing to release early
        pass


def locator(study: str, series: str, sop: str) -> str:
    return f"{LOCATOR_PREFIX}{study}/{series}/{sop}"


def parse_locator(path: str) -> tuple[str, str, str]:
    study, series, sop = path[len(LOCATOR_PREFIX):].split("/")
    return study, series, sop


def open_instance(path: str) -> IO[bytes]:
    """Open what a ``ScanRecord.path`` names: a file, or an instance of the active source (pulled
    into memory; identified DICOM is never written to disk)."""
    if not path.startswith(LOCATOR_PREFIX):
        return open(path, "rb")
    if _ACTIVE is None:
        raise RetrieveFailed("no PACS source is active in this process")
    return _InMemoryInstance(_ACTIVE.retrieve(path))
