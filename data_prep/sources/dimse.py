"""DIMSE source (``pynetdicom``): C-FIND to find series and read their instances' headers (IMAGE
level), C-GET to pull the instances of the series that pass (no listening port needed), or C-MOVE
to our own storage SCP for a PACS that refuses C-GET.

Received instances stay in memory (``Event.encoded_dataset``: the Part 10 bytes, never a file;
pynetdicom's chunked-to-disk receive mode stays off). Each process holds one association.

C-FIND returns only the attributes asked for, and no functional groups: a multi-frame instance is
therefore judged by its full header, pulled (in memory) during the scan. Only image instances that
passed every other check are pulled that way; reports, localizers and secondary captures are
refused from their C-FIND answer and never transferred.

The C-FIND header query lives in :mod:`data_prep.sources.dimse_find`, the associations, our SCP and
C-GET / C-MOVE retrieval in :mod:`data_prep.sources.dimse_retrieve` (split by concern, issue 19);
this module is the source itself: the ``dimse://`` address and the options.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from data_prep.sources.base import (
    DEFAULT_BACKOFF,
    DEFAULT_CONNECTIONS,
    DEFAULT_RATE,
    DEFAULT_RETRIES,
    DEFAULT_SERIES_BUDGET,
    DEFAULT_TIMEOUT,
    PacsError,
    RateLimiter,
)
from data_prep.sources.common import Query, SeriesBudget
from data_prep.sources.dimse_find import IMAGE_KEYS, DimseQuery

__all__ = ["IMAGE_KEYS", "DimseSource"]


class DimseSource(DimseQuery):
    """``dimse://AET@host[:port]`` (port 104 by default).

    Args:
        spec: the source; AET is the PACS' (called) AE title.
        query: attribute filters and optional study/series UIDs.
        calling_aet: our AE title, as the PACS knows it.
        retrieve: ``"get"`` (C-GET on our association) or ``"move"`` (C-MOVE to our SCP on ``move_port``
            under ``move_aet``; one connection, since one port receives).
        connections, rate, timeout, retries, backoff, series_budget: as for DICOMweb (docs/pacs.md).
    """

    def __init__(self, spec: str, query: Query, *, calling_aet: str = "MEDMAE", retrieve: str = "get",
                 move_aet: str | None = None, move_port: int | None = None,
                 connections: int = DEFAULT_CONNECTIONS, rate: float = DEFAULT_RATE,
                 timeout: float = DEFAULT_TIMEOUT, retries: int = DEFAULT_RETRIES, backoff: float = DEFAULT_BACKOFF,
                 series_budget: float = DEFAULT_SERIES_BUDGET) -> None:
        rest = spec[len("dimse://"):]
        called, at, address = rest.rpartition("@")
        host, colon, port = address.rstrip("/").rpartition(":")
        if not colon:
            host, port = address.rstrip("/"), "104"
        if not at or not _valid_aet(called) or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise PacsError("a DIMSE source is dimse://AET@host:port (AET: the PACS' AE title, at most 16 characters)")
        if not _valid_aet(calling_aet):
            raise PacsError(f"--calling-aet {calling_aet!r} is not an AE title (1 to 16 characters, no backslash)")
        if retrieve not in ("get", "move"):
            raise PacsError(f"--retrieve must be get or move (got {retrieve!r})")
        if retrieve == "move" and move_port is None:
            raise PacsError("--retrieve move needs --move-port (the port the PACS sends our instances to)")
        self.called, self.host, self.port = called, host.strip("[]"), int(port)
        self.calling_aet = calling_aet
        self.mode = retrieve
        self.move_aet = move_aet or calling_aet
        self.move_port = move_port
        self.query = query
        self.connections = 1 if retrieve == "move" else int(connections)
        self.timeout, self.retries, self.backoff = float(timeout), int(retries), float(backoff)
        self._limiter = RateLimiter(rate)
        self._budget = SeriesBudget(series_budget)
        self._sop_class: dict[str, str] = {}  # SOP instance -> class, for the retrieve contexts
        self._series_classes: dict[str, set[str]] = {}
        self._pid = -1
        self._assoc: Any = None
        self._assoc_classes: frozenset[str] = frozenset()
        self._scp: Any = None
        self._received: dict[str, bytes] = {}
        self._lock = threading.Lock()
        logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)  # it logs identifiers (dataset dumps)

    def describe(self) -> str:
        return f"dimse://{self.called}@{self.host}:{self.port}"


def _valid_aet(text: str) -> bool:
    return 0 < len(text.strip()) <= 16 and "\\" not in text and text.isprintable()
