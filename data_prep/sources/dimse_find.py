"""DIMSE C-FIND (``pynetdicom``): the series a query selects, their instances' headers (IMAGE level)
judged by prep's header parser, and the full header pulled (in memory) where C-FIND cannot be the
whole truth.

C-FIND returns only the attributes asked for, and no functional groups: a multi-frame instance is
therefore judged by its full header, pulled (in memory) during the scan. Only image instances that
passed every other check are pulled that way; reports, localizers and secondary captures are
refused from their C-FIND answer and never transferred.

Split out of :mod:`data_prep.sources.dimse` (issue 19): the query and judging side, apart from the
transport it pulls through (:mod:`data_prep.sources.dimse_retrieve`). Use
:class:`data_prep.sources.dimse.DimseSource`; import :data:`IMAGE_KEYS` from there or here.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

from data_prep.reasons import Reason
from data_prep.scan import NON_IMAGE_MODALITIES, ScanRecord
from data_prep.sources.base import PacsRefused, PacsUnreachable, RetrieveFailed
from data_prep.sources.common import (
    Query,
    header_record,
    instance_rel,
    rejected_instances,
    series_failure,
)
from data_prep.sources.dimse_retrieve import DimseRetrieval

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
_PENDING = (0xFF00, 0xFF01)
#: Refusals a C-FIND answer decides alone (the instance is never transferred).
_FINAL_FROM_FIND = frozenset({
    Reason.NON_IMAGE_SOP, Reason.DICOMDIR, Reason.LOCALIZER, Reason.BURNED_IN_ANNOTATION, Reason.SECONDARY_CAPTURE,
    Reason.COLOR_IMAGE, Reason.UNSUPPORTED_PIXEL_FORMAT, Reason.MOSAIC, Reason.TOO_LARGE,
})
#: Keys without which a C-FIND answer cannot stand for an image's header.
_NEEDED = ("SOPClassUID", "Rows", "Columns", "PhotometricInterpretation", "BitsAllocated", "ImageType")
_GEOMETRY = ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing")


class DimseQuery(DimseRetrieval):
    """C-FIND and the scan of :class:`~data_prep.sources.dimse.DimseSource` (which sets ``query``)."""

    query: Query

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
