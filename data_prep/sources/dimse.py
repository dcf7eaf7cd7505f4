"""DIMSE source (``pynetdicom``): C-FIND to find series and read their instances' headers (IMAGE
level), C-GET to pull the instances of the series that pass (no listening port needed), or C-MOVE
to our own storage SCP for a PACS that refuses C-GET.

Received instances stay in memory (``Event.encoded_dataset``: the Part 10 bytes, never a file;
pynetdicom's chunked-to-disk receive mode stays off). Each process holds one association.

C-FIND returns only the attributes asked for, and no functional groups: a multi-frame instance is
therefore judged by its full header, pulled (in memory) during the scan. Only image instances that
passed every other check are pulled that way; reports, localizers and secondary captures are
refused from their C-FIND answer and never transferred.
"""

from __future__ import annotations

import logging
import multiprocessing.util
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from data_prep.reasons import Reason
from data_prep.scan import NON_IMAGE_MODALITIES, ScanRecord
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
    RateLimiter,
    RetrieveFailed,
    Source,
    parse_locator,
)
from data_prep.sources.common import (
    Query,
    SeriesBudget,
    header_record,
    instance_rel,
    rejected_instances,
    series_failure,
)

log = logging.getLogger("data_prep")

#: What prep's header parser reads (data_prep.scan.dicom_header), asked for in every IMAGE C-FIND.
IMAGE_KEYS = (
    "SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "PatientID", "PatientName",
    "PatientBirthDate", "Modality", "Rows", "Columns", "PhotometricInterpretation", "SamplesPerPixel",
    "BitsAllocated", "BitsStored", "PixelRepresentation", "ImageType", "BurnedInAnnotation", "NumberOfFrames",
    "AcquisitionNumber", "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "ImagerPixelSpacing",
    "SliceThickness", "SpacingBetweenSlices", "RescaleSlope", "RescaleIntercept", "EchoNumbers", "EchoTime",
    "TemporalPositionIdentifier", "DiffusionBValue", "DiffusionGradientOrientation",
)
#: Transfer syntaxes offered for received instances, one presentation context each, so that the PACS
#: sends what it stores instead of transcoding (a lossy recompression would change the pixels).
_SYNTAXES = (
    "1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.2",
    "1.2.840.10008.1.2.5", "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.57",
    "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81", "1.2.840.10008.1.2.4.90",
    "1.2.840.10008.1.2.4.91",
)
_PENDING = (0xFF00, 0xFF01)
#: Refusals a C-FIND answer decides alone (the instance is never transferred).
_FINAL_FROM_FIND = frozenset({
    Reason.NON_IMAGE_SOP, Reason.DICOMDIR, Reason.LOCALIZER, Reason.BURNED_IN_ANNOTATION, Reason.SECONDARY_CAPTURE,
    Reason.COLOR_IMAGE, Reason.UNSUPPORTED_PIXEL_FORMAT, Reason.MOSAIC, Reason.TOO_LARGE,
})
#: Keys without which a C-FIND answer cannot stand for an image's header.
_NEEDED = ("SOPClassUID", "Rows", "Columns", "PhotometricInterpretation", "BitsAllocated", "ImageType")
_GEOMETRY = ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing")
_MAX_CONTEXTS = 128


class DimseSource(Source):
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

    # -- queries

    def _find(self, identifier: Any, doing: str) -> Iterator[Any]:
        """C-FIND answers (identifiers); a dropped association is reopened and the query asked again."""
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

        for tries in range(self.retries + 1):
            assoc = self._association(self._assoc_classes)
            self._limiter.wait()
            answers, status = [], None
            try:
                for status, found in assoc.send_c_find(identifier, StudyRootQueryRetrieveInformationModelFind):
                    if status is not None and status.get("Status") in _PENDING and found is not None:
                        answers.append(found)
            except RuntimeError:  # the association dropped between the check and the request
                status = None
            code = status.get("Status") if status is not None else None
            if code == 0x0000:
                return iter(answers)
            if code is not None:  # the PACS answered: a refusal, not a network problem
                raise PacsRefused(f"{self.describe()} answered C-FIND status 0x{int(code):04X} while {doing}")
            self._release()
            time.sleep(self.backoff * 2**tries)
        raise PacsUnreachable(f"{self.describe()} stopped answering while {doing} ({self.retries + 1} tries)")

    def _series(self) -> list[tuple[str, str, str]]:
        from pydicom import Dataset

        searches = [dict(self.query.filters)]
        if self.query.uids:
            searches = [{**self.query.filters, key: uid} for uid in self.query.uids
                        for key in ("StudyInstanceUID", "SeriesInstanceUID")]
        found: dict[tuple[str, str], str] = {}
        for filters in searches:
            ds = Dataset()
            ds.QueryRetrieveLevel = "SERIES"
            for key in ("StudyInstanceUID", "SeriesInstanceUID", "Modality"):
                setattr(ds, key, None)
            for key, value in filters.items():
                setattr(ds, key, value)
            for answer in self._find(ds, "searching series (C-FIND)"):
                key = (str(answer.get("StudyInstanceUID", "")), str(answer.get("SeriesInstanceUID", "")))
                if all(key):
                    found[key] = str(answer.get("Modality", "")).upper()
        return [(st, se, found[(st, se)]) for st, se in sorted(found)]

    def scan(self, *, max_voxels: int, allow_secondary: bool, on_progress: Callable[[int], None] | None = None
             ) -> list[ScanRecord]:
        from pydicom import Dataset

        records: list[ScanRecord] = []
        for study, series, modality in self._series():
            ds = Dataset()
            ds.QueryRetrieveLevel = "IMAGE"
            for key in IMAGE_KEYS if modality not in NON_IMAGE_MODALITIES else ("SOPInstanceUID",):
                setattr(ds, key, None)  # a return key: empty
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
            try:
                answers = list(self._find(ds, "reading a series' headers (C-FIND)"))
                if modality in NON_IMAGE_MODALITIES:  # reports, RT, KO...: listed, never read
                    batch = rejected_instances(study, series, [str(a.get("SOPInstanceUID", "")) for a in answers],
                                               Reason.NON_IMAGE_SOP)
                else:
                    batch = self._with_modality_lut(
                        [self._judge(a, study, series, max_voxels, allow_secondary) for a in answers],
                        study, series, max_voxels, allow_secondary)
            except PacsRefused as e:  # this series' answer is bad: counted, the others go on
                log.warning("%s", e)
                batch = [series_failure(study, series, Reason.PACS_RETRIEVE_FAILED)]
            records.extend(batch)
            if on_progress is not None:
                on_progress(len(batch))
        self.close()  # no socket of ours may be inherited by the build workers
        return records

    def _judge(self, answer: Any, study: str, series: str, max_voxels: int, allow_secondary: bool) -> ScanRecord:
        """A C-FIND identifier through prep's header parser.

        A refusal on content (a report, localizer, secondary capture, colour...) stands: that instance
        is never transferred. An image is judged by its full header, pulled into memory, when the
        answer cannot be the whole truth: a multi-frame file (C-FIND carries no functional groups), or
        a PACS that did not return the keys an image needs (many return only their database columns).
        """
        answer.StudyInstanceUID, answer.SeriesInstanceUID = study, series
        record = header_record(answer, study, series, max_voxels, allow_secondary)
        sop, sop_class = str(answer.get("SOPInstanceUID", "")), str(answer.get("SOPClassUID", ""))
        if record.reason in _FINAL_FROM_FIND:
            return record
        self._sop_class[sop] = sop_class
        self._series_classes.setdefault(series, set()).add(sop_class)
        if record.reason is Reason.MULTIFRAME_WITHOUT_GEOMETRY or _incomplete(answer):
            return self._judge_full(study, series, sop, max_voxels, allow_secondary)
        return record

    def _with_modality_lut(self, batch: list[ScanRecord], study: str, series: str, max_voxels: int,
                           allow_secondary: bool) -> list[ScanRecord]:
        """C-FIND cannot say whether an image carries a Modality LUT Sequence (a PACS refuses sequence
        keys), and the stored values depend on it: the first image of the series is judged by its full
        header, and if it has one, every image of the series is."""
        images = [i for i, r in enumerate(batch) if r.kind == "dicom" and r.dicom is not None]
        if not images:
            return batch
        first = batch[images[0]]
        assert first.dicom is not None
        probe = self._judge_full(study, series, first.dicom.sop_instance, max_voxels, allow_secondary)
        if probe.dicom is None or not probe.dicom.has_modality_lut:
            return batch
        for i in images:
            r = batch[i]
            assert r.dicom is not None
            batch[i] = self._judge_full(study, series, r.dicom.sop_instance, max_voxels, allow_secondary)
        return batch

    def _judge_full(self, study: str, series: str, sop: str, max_voxels: int, allow_secondary: bool) -> ScanRecord:
        import io

        from data_prep.streams import StreamTooLarge, read_dicom

        try:
            data = self._pull(study, series, sop)
        except RetrieveFailed as e:
            log.warning("%s", e)
            return ScanRecord(instance_rel(study, series, sop), "", "reject", Reason(e.reason))
        try:
            ds = read_dicom(io.BytesIO(data), force=True, header_only=True, max_voxels=max_voxels).ds
        except StreamTooLarge:
            return ScanRecord(instance_rel(study, series, sop), "", "reject", Reason.TOO_LARGE)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException:
            return ScanRecord(instance_rel(study, series, sop), "", "reject", Reason.DICOM_UNREADABLE)
        return header_record(ds, study, series, max_voxels, allow_secondary)

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


def _incomplete(answer: Any) -> bool:
    """Whether the PACS left out keys an image's header has: the full header must then judge it."""
    from data_prep.scan import PROJECTION_MODALITIES

    def empty(key: str) -> bool:
        value = answer.get(key)
        return value is None or (hasattr(value, "__len__") and len(value) == 0)

    if any(empty(key) for key in _NEEDED):
        return True
    if str(answer.get("Modality", "")).upper() in PROJECTION_MODALITIES:
        return False
    return any(empty(key) for key in _GEOMETRY)


def _valid_aet(text: str) -> bool:
    return 0 < len(text.strip()) <= 16 and "\\" not in text and text.isprintable()
