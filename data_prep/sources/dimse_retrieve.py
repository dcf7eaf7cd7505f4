"""DIMSE transport (``pynetdicom``): this process' association, our storage SCP for C-MOVE, the
in-memory receipt of C-STORE sub-operations, and retrieval of one instance by C-GET or C-MOVE.

Split out of :mod:`data_prep.sources.dimse` (issue 19) so that the connection and transfer side reads
apart from the C-FIND header query (:mod:`data_prep.sources.dimse_find`) built on it. Received
instances stay in memory (``Event.encoded_dataset``: the Part 10 bytes, never a file). Use
:class:`data_prep.sources.dimse.DimseSource`; this base is not a source on its own.
"""

from __future__ import annotations

import multiprocessing.util
import os
import threading
import time
from typing import Any

from data_prep.sources.base import (
    PacsRefused,
    PacsUnreachable,
    RateLimiter,
    RetrieveFailed,
    Source,
    parse_locator,
)
from data_prep.sources.common import SeriesBudget

#: Transfer syntaxes offered for received instances, one presentation context each, so that the PACS
#: sends what it stores instead of transcoding (a lossy recompression would change the pixels).
_SYNTAXES = (
    "1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.2",
    "1.2.840.10008.1.2.5", "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.57",
    "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81", "1.2.840.10008.1.2.4.90",
    "1.2.840.10008.1.2.4.91",
)
_MAX_CONTEXTS = 128


class DimseRetrieval(Source):
    """Associations, the C-MOVE SCP and C-GET / C-MOVE retrieval of :class:`~data_prep.sources.dimse.DimseSource`
    (which sets these attributes in its ``__init__``)."""

    called: str
    host: str
    port: int
    calling_aet: str
    mode: str
    move_aet: str
    move_port: int | None
    timeout: float
    retries: int
    backoff: float
    _limiter: RateLimiter
    _budget: SeriesBudget
    _sop_class: dict[str, str]
    _series_classes: dict[str, set[str]]
    _pid: int
    _assoc: Any
    _assoc_classes: frozenset[str]
    _scp: Any
    _received: dict[str, bytes]
    _lock: threading.Lock

    # -- associations

    def _association(self, classes: frozenset[str] = frozenset()) -> Any:
        """This process' association, with storage contexts for ``classes`` (C-GET); reopened when
        it dropped, when the process is a fresh worker, or when other SOP classes are needed."""
        if self._pid != os.getpid():
            self._assoc, self._scp, self._received, self._pid = None, None, {}, os.getpid()
            self._lock = threading.Lock()
            # pynetdicom's network thread is not a daemon: a build worker would wait for it at exit
            # until the PACS drops us. multiprocessing runs these finalizers before joining threads.
            multiprocessing.util.Finalize(None, self.close, exitpriority=100)
        need = classes if self.mode == "get" else frozenset()
        if self._assoc is not None and self._assoc.is_established and need <= self._assoc_classes:
            return self._assoc
        self._release()
        self._assoc = self._open(need)
        self._assoc_classes = need
        return self._assoc

    def _ae(self) -> Any:
        from pynetdicom import AE

        ae = AE(ae_title=self.calling_aet)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout
        ae.connection_timeout = self.timeout
        return ae

    def _open(self, classes: frozenset[str]) -> Any:
        from pynetdicom import build_role, evt
        from pynetdicom.sop_class import (
            StudyRootQueryRetrieveInformationModelFind,
            StudyRootQueryRetrieveInformationModelGet,
            StudyRootQueryRetrieveInformationModelMove,
        )

        ae = self._ae()
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet if self.mode == "get"
                                 else StudyRootQueryRetrieveInformationModelMove)
        roles = []
        for sop_class in sorted(classes):
            if len(ae.requested_contexts) + len(_SYNTAXES) > _MAX_CONTEXTS:
                raise RetrieveFailed(f"{self.describe()}: one series holds more SOP classes than one association "
                                     "can negotiate")
            for syntax in _SYNTAXES:
                ae.add_requested_context(sop_class, syntax)
            roles.append(build_role(sop_class, scp_role=True))
        handlers = [(evt.EVT_C_STORE, self._on_store)] if self.mode == "get" else []
        tries = 0
        while True:
            self._limiter.wait()
            assoc = ae.associate(self.host, self.port, ae_title=self.called, ext_neg=roles, evt_handlers=handlers)
            if assoc.is_established:
                return assoc
            if assoc.is_rejected:
                raise PacsRefused(f"{self.describe()} rejected the association from AE {self.calling_aet}: register "
                                  "it on the PACS (see docs/pacs.md)")
            if tries >= self.retries:
                raise PacsUnreachable(f"{self.describe()} is unreachable (no association after {tries + 1} tries)")
            time.sleep(self.backoff * 2**tries)
            tries += 1

    def _release(self) -> None:
        if self._assoc is not None:
            try:
                if self._assoc.is_established:
                    self._assoc.release()
            except Exception:  # noqa: BLE001 - a dead peer: nothing to release
                pass
        self._assoc = None

    def close(self) -> None:
        if self._pid == os.getpid():
            self._release()
            if self._scp is not None:
                self._scp.shutdown()
        self._assoc = self._scp = None

    def _on_store(self, event: Any) -> int:
        """C-STORE sub-operation (C-GET) or C-STORE from the PACS (C-MOVE): keep the Part 10 bytes."""
        try:
            data = event.encoded_dataset(include_meta=True)
            sop = str(event.request.AffectedSOPInstanceUID)
        except Exception:  # noqa: BLE001 - a broken sub-operation: the retrieve then reports the instance missing
            return 0xC210
        with self._lock:
            self._received[sop] = data
        return 0x0000

    def _ensure_scp(self) -> None:
        """C-MOVE: our storage SCP on ``move_port``, started once per process (threads, no files)."""
        if self._scp is not None:
            return
        from pynetdicom import AllStoragePresentationContexts, evt

        ae = self._ae()
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, list(_SYNTAXES))
        ae.require_called_aet = True
        try:
            self._scp = ae.start_server(("", int(self.move_port or 0)), block=False, ae_title=self.move_aet,
                                        evt_handlers=[(evt.EVT_C_STORE, self._on_store)])
        except OSError as e:
            raise RetrieveFailed(f"our C-MOVE SCP cannot listen on port {self.move_port} ({e.__class__.__name__})"
                                 ) from None

    # -- retrieval

    def retrieve(self, locator: str) -> bytes:
        study, series, sop = parse_locator(locator)
        self._budget.check(series)
        return self._pull(study, series, sop)

    def _pull(self, study: str, series: str, sop: str) -> bytes:
        from pydicom import Dataset
        from pynetdicom.sop_class import (
            StudyRootQueryRetrieveInformationModelGet,
            StudyRootQueryRetrieveInformationModelMove,
        )

        ds = Dataset()
        ds.QueryRetrieveLevel = "IMAGE"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study, series, sop
        classes = frozenset(self._series_classes.get(series, ()) | {self._sop_class.get(sop, "")} - {""})
        verb = "C-GET" if self.mode == "get" else "C-MOVE"
        for tries in range(self.retries + 1):
            try:
                assoc = self._association(classes)
                if self.mode == "move":
                    self._ensure_scp()
            except PacsRefused as e:
                raise RetrieveFailed(str(e)) from None
            except PacsUnreachable as e:
                raise RetrieveFailed(str(e), "pacs_unreachable") from None
            self._limiter.wait()
            status = None
            try:
                if self.mode == "get":
                    answers = assoc.send_c_get(ds, StudyRootQueryRetrieveInformationModelGet)
                else:
                    answers = assoc.send_c_move(ds, self.move_aet, StudyRootQueryRetrieveInformationModelMove)
                for status, _ in answers:  # noqa: B007 - the last status is the operation's
                    pass
            except RuntimeError:  # the association dropped between the check and the request
                status = None
            with self._lock:
                data = self._received.pop(sop, None)
                self._received.clear()
            code = status.get("Status") if status is not None else None
            if data is not None and code == 0x0000:
                return data
            if code == 0x0000:  # "success" without the instance: not a network problem, no use retrying
                raise RetrieveFailed(f"{self.describe()} reported {verb} success but sent no instance")
            if code is not None and code not in (0xA701, 0xA702):  # answered; out of resources may pass
                raise RetrieveFailed(f"{self.describe()} answered {verb} status 0x{int(code):04X}")
            self._release()
            time.sleep(self.backoff * 2**tries)
        raise RetrieveFailed(f"{self.describe()} stopped answering during {verb} ({self.retries + 1} tries)",
                             "pacs_unreachable")
