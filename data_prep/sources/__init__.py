"""Where prep reads DICOM from: folders (prep's scan, the default), a DICOMweb server, a DIMSE PACS.

All sources meet prep at two points (:class:`~data_prep.sources.base.Source`): metadata in, as
``ScanRecord``s judged by prep's own header parser, and instance bytes out, read in the build
worker through :func:`~data_prep.sources.base.open_instance`. Series assembly, validation, reasons,
de-identification, cache and manifest are prep's, unchanged. See docs/pacs.md.

    source = open_source("dicomweb+https://pacs.example/dicom-web", query=["Modality=CT"])
    prep_archive([], Path("/data/cache"), source=source)
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from data_prep.sources.base import (
    DEFAULT_BACKOFF,
    DEFAULT_CONNECTIONS,
    DEFAULT_RATE,
    DEFAULT_RETRIES,
    DEFAULT_SERIES_BUDGET,
    DEFAULT_TIMEOUT,
    PacsError,
    PacsRefused,
    PacsUnreachable,
    RetrieveFailed,
    Source,
    open_instance,
)

__all__ = [
    "PacsError", "PacsRefused", "PacsUnreachable", "RetrieveFailed", "Source", "is_source_spec", "open_instance",
    "open_source",
]

_SCHEMES = ("dicomweb+http://", "dicomweb+https://", "dimse://")


def is_source_spec(text: str) -> bool:
    """Whether a positional argument of ``medmae prep`` names a PACS rather than a folder."""
    return str(text).lower().startswith(_SCHEMES)


def open_source(
    spec: str,
    *,
    query: Sequence[str] = (),
    uids_file: Path | None = None,
    credentials_file: Path | None = None,
    ca_bundle: Path | None = None,
    connections: int = DEFAULT_CONNECTIONS,
    rate: float = DEFAULT_RATE,
    timeout: float = DEFAULT_TIMEOUT,
    retries: int = DEFAULT_RETRIES,
    backoff: float = DEFAULT_BACKOFF,
    series_budget: float = DEFAULT_SERIES_BUDGET,
    calling_aet: str = "MEDMAE",
    retrieve: str = "get",
    move_aet: str | None = None,
    move_port: int | None = None,
) -> Source:
    """The source a spec names, configured; nothing is contacted yet.

    Raises:
        PacsError: a spec, query, UID file or credentials that cannot work (one line, no secrets).
    """
    from data_prep.sources.common import Query, parse_query, read_credentials, read_uids

    if not (isinstance(connections, int) and connections >= 1):
        raise PacsError(f"--pacs-connections must be a positive integer (got {connections!r})")
    if not (isinstance(retries, int) and retries >= 0):
        raise PacsError(f"--pacs-retries must be 0 or more (got {retries!r})")
    for name, value in (("--pacs-rate", rate), ("--pacs-timeout", timeout), ("--pacs-series-budget", series_budget)):
        if not (isinstance(value, int | float) and 0 < value < float("inf")):
            raise PacsError(f"{name} must be a positive number (got {value!r})")
    q = Query(parse_query(query), read_uids(uids_file) if uids_file is not None else ())
    lowered = spec.lower()
    if lowered.startswith(("dicomweb+http://", "dicomweb+https://")):
        from data_prep.sources.dicomweb import DicomWebSource

        return DicomWebSource(spec, q, secret=read_credentials(credentials_file),
                              ca_bundle=str(ca_bundle) if ca_bundle is not None else None,
                              connections=connections, rate=rate, timeout=timeout, retries=retries,
                              backoff=backoff, series_budget=series_budget)
    if lowered.startswith("dimse://"):
        from data_prep.sources.dimse import DimseSource

        if credentials_file is not None:
            raise PacsError("DIMSE has no credentials: the PACS admits us by AE title (see docs/pacs.md)")
        return DimseSource(spec, q, calling_aet=calling_aet, retrieve=retrieve, move_aet=move_aet,
                           move_port=move_port, connections=connections, rate=rate, timeout=timeout,
                           retries=retries, backoff=backoff, series_budget=series_budget)
    raise PacsError(f"not a PACS source (expected {', '.join(_SCHEMES)}...)")
