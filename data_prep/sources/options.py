"""``medmae prep`` options for PACS sources, kept beside the sources so the prep CLI only wires them."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from pathlib import Path

from data_prep.sources import is_source_spec, open_source
from data_prep.sources.base import (
    CREDENTIALS_ENV,
    DEFAULT_CONNECTIONS,
    DEFAULT_RATE,
    DEFAULT_RETRIES,
    DEFAULT_SERIES_BUDGET,
    DEFAULT_TIMEOUT,
    PacsError,
    Source,
)


def _positive(kind: Callable[[str], float]) -> Callable[[str], float]:
    """An argparse type: a positive finite number of ``kind`` (int or float)."""

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
        if not 0 < value < float("inf"):
            raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
        return value

    return parse


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 0 or more, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected 0 or more, got {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The PACS options (docs/pacs.md); they apply when the positional argument is a source spec."""
    g = parser.add_argument_group(
        "PACS source", "pull from a PACS instead of folders: give one source, dicomweb+https://host/dicom-web or "
        "dimse://AET@host:port, as the positional argument (see docs/pacs.md)")
    g.add_argument("--query", action="append", default=[], metavar="KEY=VALUE",
                   help="DICOM attribute filter, repeatable (e.g. Modality=CT, StudyDate=20240101-20241231)")
    g.add_argument("--uids", type=Path, default=None, metavar="FILE",
                   help="pull only these studies or series: a file of StudyInstanceUIDs / SeriesInstanceUIDs, "
                   "one a line")
    g.add_argument("--pacs-credentials", type=Path, default=None, metavar="FILE",
                   help=f"DICOMweb credentials file (mode 0600): user:password, a password (user in the URL) or "
                   f"'Bearer TOKEN'; default ${CREDENTIALS_ENV}. Never on the command line")
    g.add_argument("--pacs-ca-bundle", type=Path, default=None, metavar="FILE",
                   help="CA certificates to verify the server's TLS certificate (private PKI); verification is "
                   "always on")
    g.add_argument("--pacs-connections", type=_positive(int), default=DEFAULT_CONNECTIONS, metavar="N",
                   help=f"connections (= build workers) at most (default {DEFAULT_CONNECTIONS})")
    g.add_argument("--pacs-rate", type=_positive(float), default=DEFAULT_RATE, metavar="R",
                   help=f"requests per second, the whole run together (default {DEFAULT_RATE:g})")
    g.add_argument("--pacs-timeout", type=_positive(float), default=DEFAULT_TIMEOUT, metavar="S",
                   help=f"seconds per request (default {DEFAULT_TIMEOUT:g})")
    g.add_argument("--pacs-retries", type=_count, default=DEFAULT_RETRIES, metavar="N",
                   help=f"retries with exponential backoff after timeouts, refusals, 429 and 5xx "
                   f"(default {DEFAULT_RETRIES})")
    g.add_argument("--pacs-series-budget", type=_positive(float), default=DEFAULT_SERIES_BUDGET, metavar="S",
                   help=f"seconds retrieving one series may take (default {DEFAULT_SERIES_BUDGET:g}); past it the "
                   "series is pacs_retrieve_failed and pulled again by the next run")
    g.add_argument("--calling-aet", default="MEDMAE", metavar="AET",
                   help="DIMSE: our AE title, as registered on the PACS (default MEDMAE)")
    g.add_argument("--retrieve", choices=("get", "move"), default="get",
                   help="DIMSE: C-GET (default; no listening port) or C-MOVE to our own SCP")
    g.add_argument("--move-aet", default=None, metavar="AET",
                   help="DIMSE C-MOVE: the destination AE title the PACS knows us by (default: --calling-aet)")
    g.add_argument("--move-port", type=_positive(int), default=None, metavar="PORT",
                   help="DIMSE C-MOVE: the port our SCP listens on (the PACS must map --move-aet to it)")


_PACS_ONLY = ("query", "uids", "pacs_credentials", "pacs_ca_bundle", "move_port", "move_aet")


def source_from_args(args: argparse.Namespace) -> tuple[list[Path], Source | None]:
    """``(archive folders, None)`` or ``([], the source)`` from parsed ``medmae prep`` arguments.

    Raises:
        PacsError: a source mixed with folders or with another source, PACS options without a
            source, or a source that cannot work (one line, no secrets).
    """
    given: Sequence[str] = [str(a) for a in args.archives]
    specs = [a for a in given if is_source_spec(a)]
    if not specs:
        used = [f"--{name.replace('_', '-')}" for name in _PACS_ONLY if getattr(args, name) not in (None, [])]
        if used:
            raise PacsError(f"{used[0]} needs a PACS source (dicomweb+https://... or dimse://...)")
        return [Path(a) for a in given], None
    if len(given) > 1:
        raise PacsError("give one PACS source, or archive folders, not both")
    return [], open_source(
        specs[0], query=args.query, uids_file=args.uids, credentials_file=args.pacs_credentials,
        ca_bundle=args.pacs_ca_bundle, connections=args.pacs_connections, rate=args.pacs_rate,
        timeout=args.pacs_timeout, retries=args.pacs_retries, series_budget=args.pacs_series_budget,
        calling_aet=args.calling_aet, retrieve=args.retrieve, move_aet=args.move_aet, move_port=args.move_port,
    )
