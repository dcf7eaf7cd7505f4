"""Compact scan records: one shared instance of every value the files of a series repeat.

The scan holds one record per file until series assembly (issue 20: prep peak RSS at 10⁶ files).
Read header by header, each record carries its own copy of values that are the same for every
file of a series — the SOP class, series and patient keys, modality, photometric, the orientation
and pixel-spacing tuples, rescale slope and intercept, the split keys, even the floats of the
in-plane position — about 1.6 KB per file. :class:`Compactor` rebuilds each record as it arrives
from the scan with those values replaced by one canonical instance (a bounded intern table, cleared
when full: files of a series arrive together, so sharing survives the clearing), leaving per file
only what is really its own: path, rel, SOPInstanceUID, slice position and the small objects
holding them.

Interning is exact: values are shared only when they are the same type and, for floats, the same
bits (``-0.0`` is never merged with ``0.0``, nor ``1`` with ``1.0``), so every ``repr``, hash and
computation downstream — plan keys, series fingerprints, affines — is unchanged.
"""

from __future__ import annotations

import dataclasses
import math
import struct
from typing import TYPE_CHECKING, Any

from data_prep.headers import DicomHeader, FrameInfo

if TYPE_CHECKING:
    from data_prep.scan import ScanRecord

#: Entries of the intern table before it is cleared (~70 bytes each).
INTERN_LIMIT = 1 << 16


class Compactor:
    """Rebuilds scan records with their repeated values shared (see the module docstring)."""

    def __init__(self, limit: int = INTERN_LIMIT) -> None:
        self._table: dict[Any, Any] = {}
        self._limit = limit

    def record(self, rec: ScanRecord) -> ScanRecord:
        """``rec`` with its header's repeated values shared; records without a DICOM header as they are."""
        h = rec.dicom
        if h is None:
            return rec
        if len(self._table) >= self._limit:  # never in the middle of a record: keys hold ids of live entries
            self._table.clear()
        return dataclasses.replace(rec, dicom=self.header(h))

    def header(self, h: DicomHeader) -> DicomHeader:
        v = self.value
        return DicomHeader(
            sop_class=v(h.sop_class),
            sop_instance=h.sop_instance,  # one per file: interning it would only grow the table
            series_uid=v(h.series_uid),
            patient_key=v(h.patient_key),
            modality=v(h.modality),
            rows=v(h.rows),
            columns=v(h.columns),
            photometric=v(h.photometric),
            bits_stored=v(h.bits_stored),
            pixel_representation=v(h.pixel_representation),
            has_modality_lut=h.has_modality_lut,
            acquisition_number=v(h.acquisition_number),
            projection=h.projection,
            secondary_capture=h.secondary_capture,
            enhanced=h.enhanced,
            frames=tuple(self.frame(f) for f in h.frames),
        )

    def frame(self, f: FrameInfo) -> FrameInfo:
        v = self.value
        position = f.position
        if type(position) is tuple:  # the tuple is the file's own; its in-plane floats are shared
            position = tuple(v(x) for x in position)  # type: ignore[assignment]
        return FrameInfo(
            position=position,
            orientation=v(f.orientation),
            pixel_spacing=v(f.pixel_spacing),
            slice_thickness=v(f.slice_thickness),
            spacing_between_slices=v(f.spacing_between_slices),
            slope=v(f.slope),
            intercept=v(f.intercept),
            split=v(f.split),
        )

    def value(self, x: Any) -> Any:
        """The canonical instance of ``x`` (a str, int, float, or tuple of them); anything else as it is."""
        key = self._key(x)
        if key is None:
            return x
        found = self._table.get(key)
        if found is not None:
            return found
        if type(x) is tuple:  # made of the canonical elements whose ids are its key: they live as long as it
            x = tuple(self.value(e) for e in x)
        self._table[key] = x
        return x

    def _key(self, x: Any) -> Any:
        t = type(x)
        if t is str:
            return x
        if t is int:
            return (int, x)
        if t is float:
            if x != 0.0 and not math.isnan(x):
                return (float, x)  # equal non-zero, non-NaN floats have the same bits
            return (float, struct.pack("<d", x))
        if t is tuple:  # by the ids of its canonical elements (interned here, so they are in the table)
            keys = []
            for e in x:
                if self._key(e) is None:
                    return None
                keys.append(id(self.value(e)))
            return (tuple, tuple(keys))
        return None
