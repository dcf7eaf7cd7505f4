"""The series of an index as columns of numpy arrays: what DataLoader workers read per sample.

Why columns and not the manifest's ``ManifestRow`` objects: DataLoader workers are forked from the
main process and share its memory copy-on-write. Reading a Python object, even an attribute, changes
its reference count, which writes to its memory page, so the worker gets a private copy of that page;
over an epoch a worker touches every series and ends up with its own copy of all of them, so its
memory grows with the number of series (issue 20). A numpy array is one object whatever its length:
reading its elements writes nothing, and its data stays shared between the main process and every
worker. So the indices (``SliceIndex``, ``VolumeIndex``) turn their rows into a :class:`SeriesTable`
once, in the main process at setup, and keep no row object; a worker builds the one record a sample
needs from the columns (:meth:`SeriesTable.row`) and drops it with the sample.

Columns, for ``n`` series:

* numbers: ``shapes`` int64 ``(n, 3)``, ``spacings`` float64 ``(n, 3)``, ``stats`` float64
  ``(n, len(STAT_KEYS))`` (``stats_absent`` marks the keys a hand-made record lacks), ``affines``
  float64 ``(n, 4, 4)``, ``patients`` int64 ``(n,)`` (a number per distinct patient id, in order of
  first appearance, for counting patients);
* categories (``modality``, ``source``, ``kind``, ``dtype``, ``intensity``, ``modality_source``, ``split``):
  int32 codes ``(n,)`` into a small vocabulary of the distinct strings (``split`` -1: a plain
  ``SeriesRecord`` without one);
* text (``series_id``, ``patient_id``, ``array``): one UTF-8 ``bytes`` buffer + int64 offsets ``(n + 1,)``.

Floats are stored as float64, so a record rebuilt from the columns equals the row it came from
(``SeriesTable.from_rows(rows).row(i) == rows[i]``) and every sample computed from it is the same,
bit for bit.
"""

from __future__ import annotations

import itertools
import math
import operator
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, overload

import numpy as np

from medmae.data.cache import STAT_KEYS, ManifestRow, SeriesRecord

#: Fields stored as codes into a vocabulary of their distinct values.
CATEGORIES: tuple[str, ...] = ("modality", "source", "kind", "dtype", "intensity", "modality_source", "split")
#: Fields stored as one byte buffer + offsets.
TEXTS: tuple[str, ...] = ("series_id", "patient_id", "array")
_STAT_GETTER = operator.itemgetter(*STAT_KEYS)


def _numbers(rows: Sequence[SeriesRecord]) -> np.ndarray:
    """Shape, spacing, stats and affine of every record as one float64 ``(n, 22 + len(STAT_KEYS))``
    array, in one ``np.fromiter`` pass (several times faster than ``np.array`` of nested tuples at
    10^5 series; shapes are integers far below 2**53, exact in float64)."""
    width = 6 + len(STAT_KEYS) + 16
    values = []
    for r in rows:
        a0, a1, a2, a3 = r.affine
        v = (*r.shape, *r.spacing, *_stat_values(r), *a0, *a1, *a2, *a3)
        if len(v) != width or len(r.shape) != 3 or len(r.spacing) != 3:
            raise ValueError(f"series {r.series_id}: shape and spacing need 3 numbers each, affine 4 x 4")
        values.append(v)
    flat = np.fromiter(itertools.chain.from_iterable(values), dtype=np.float64, count=len(values) * width)
    return flat.reshape(len(values), width)


def _stat_values(record: SeriesRecord) -> tuple[float, ...]:
    """``record.stats`` in ``STAT_KEYS`` order (NaN for an absent key)."""
    stats = record.stats
    if len(stats) == len(STAT_KEYS):
        try:
            return _STAT_GETTER(stats)  # the usual case: exactly the schema's keys
        except KeyError:
            pass
    unknown = sorted(set(stats) - set(STAT_KEYS))
    if unknown:
        raise ValueError(f"series {record.series_id}: stats key {unknown[0]!r} is not one of {STAT_KEYS}")
    return tuple(stats.get(k, math.nan) for k in STAT_KEYS)


class TextColumn:
    """``n`` strings as one UTF-8 ``bytes`` buffer and the ``n + 1`` offsets (int64) of their ends."""

    def __init__(self, values: Iterable[str]) -> None:
        encoded = [v.encode("utf-8") for v in values]
        self.offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(b) for b in encoded], out=self.offsets[1:])
        #: one object whatever the number of strings; slicing it copies the slice and writes nothing
        self.buffer = b"".join(encoded)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> str:
        return self.buffer[self.offsets[i] : self.offsets[i + 1]].decode("utf-8")


class SeriesTable:
    """Every field of ``n`` series records as numpy columns (see the module docstring).

    Build it with :meth:`from_rows`; read a value with the columns (``shapes[i]``, ``code("kind")``,
    ``series_ids[i]``) or rebuild a whole record with :meth:`row`.
    """

    def __init__(self) -> None:  # use from_rows
        self.shapes = np.zeros((0, 3), dtype=np.int64)
        self.spacings = np.zeros((0, 3), dtype=np.float64)
        self.stats = np.zeros((0, len(STAT_KEYS)), dtype=np.float64)
        self.affines = np.zeros((0, 4, 4), dtype=np.float64)
        #: which stats keys a record lacks (``(n, len(STAT_KEYS))`` bool), or None when none lacks any
        self.stats_absent: np.ndarray | None = None
        self.patients = np.zeros(0, dtype=np.int64)
        self.codes: dict[str, np.ndarray] = {name: np.zeros(0, dtype=np.int32) for name in CATEGORIES}
        self.vocab: dict[str, tuple[str, ...]] = {name: () for name in CATEGORIES}
        self.series_ids = TextColumn(())
        self.patient_ids = TextColumn(())
        self.arrays = TextColumn(())

    @classmethod
    def from_rows(cls, rows: Iterable[SeriesRecord]) -> SeriesTable:
        """The columns of ``rows`` (``ManifestRow`` or plain ``SeriesRecord``), in order.

        Raises:
            ValueError: a row's ``stats`` has a key that is not one of ``STAT_KEYS``.
        """
        rows = tuple(rows)
        table = cls()
        n = len(rows)
        numbers = _numbers(rows)  # (n, 3 + 3 + len(STAT_KEYS) + 16): shape, spacing, stats, affine
        table.shapes = numbers[:, :3].astype(np.int64)
        table.spacings = numbers[:, 3:6].copy()
        table.stats = numbers[:, 6:-16].copy()
        table.affines = numbers[:, -16:].reshape(n, 4, 4).copy()
        if any(len(r.stats) != len(STAT_KEYS) for r in rows):  # hand-made records only: load_manifest checks
            table.stats_absent = np.array([[k not in r.stats for k in STAT_KEYS] for r in rows], dtype=bool)
        for name in CATEGORIES:
            if name == "split":
                values = [r.split if isinstance(r, ManifestRow) else None for r in rows]
            else:
                values = list(map(operator.attrgetter(name), rows))
            vocab = tuple(sorted({v for v in values if v is not None}))
            lookup: dict[str | None, int] = {v: i for i, v in enumerate(vocab)}
            lookup[None] = -1
            table.codes[name] = np.fromiter(map(lookup.__getitem__, values), dtype=np.int32, count=n)
            table.vocab[name] = vocab
        table.series_ids = TextColumn(r.series_id for r in rows)
        table.patient_ids = TextColumn(r.patient_id for r in rows)
        table.arrays = TextColumn(r.array for r in rows)
        patients: dict[str, int] = {}
        table.patients = np.fromiter(
            (patients.setdefault(r.patient_id, len(patients)) for r in rows), dtype=np.int64, count=n
        )
        return table

    def __len__(self) -> int:
        return len(self.shapes)

    def code(self, name: str) -> np.ndarray:
        """The codes of category ``name`` (``(n,)`` int32; see :attr:`vocab`)."""
        return self.codes[name]

    def value(self, name: str, i: int) -> str:
        """The value of category ``name`` of series ``i``."""
        return self.vocab[name][int(self.codes[name][i])]

    def is_value(self, name: str, value: str) -> np.ndarray:
        """Boolean mask of the series whose category ``name`` is ``value``."""
        vocab = self.vocab[name]
        return self.codes[name] == (vocab.index(value) if value in vocab else -2)

    def groups(self, name: str) -> dict[str, np.ndarray]:
        """Value of category ``name`` -> indices of the series that have it, sorted by value; values
        no series has are left out."""
        codes = self.codes[name]
        found = {v: np.flatnonzero(codes == c) for c, v in enumerate(self.vocab[name])}
        return {v: members for v, members in sorted(found.items()) if len(members)}

    def row(self, i: int) -> SeriesRecord:
        """The record of series ``i``, rebuilt from the columns (equal to the row it was built from)."""
        i = int(i)
        codes, vocab = self.codes, self.vocab
        stats = self.stats[i].tolist()
        fields: dict[str, Any] = {
            "series_id": self.series_ids[i],
            "patient_id": self.patient_ids[i],
            "modality": vocab["modality"][codes["modality"][i]],
            "source": vocab["source"][codes["source"][i]],
            "kind": vocab["kind"][codes["kind"][i]],
            "array": self.arrays[i],
            "shape": tuple(self.shapes[i].tolist()),
            "spacing": tuple(self.spacings[i].tolist()),
            "dtype": vocab["dtype"][codes["dtype"][i]],
            "intensity": vocab["intensity"][codes["intensity"][i]],
            "stats": dict(zip(STAT_KEYS, stats, strict=True)),
            "affine": tuple(map(tuple, self.affines[i].tolist())),
            "modality_source": vocab["modality_source"][codes["modality_source"][i]],
        }
        if self.stats_absent is not None and self.stats_absent[i].any():
            absent = self.stats_absent[i].tolist()
            fields["stats"] = {k: v for k, v, gone in zip(STAT_KEYS, stats, absent, strict=True) if not gone}
        split = codes["split"][i]
        cls = SeriesRecord if split < 0 else ManifestRow
        if split >= 0:
            fields["split"] = vocab["split"][split]
        # the frozen dataclass' __init__ only sets these fields (one object.__setattr__ each, most of
        # the cost of a sample's record); filling __dict__ directly makes the same, equal object
        record = object.__new__(cls)
        record.__dict__.update(fields)
        return record

    def columns(self) -> Iterator[np.ndarray]:
        """Every per-series column as a numpy array (the text buffers as ``uint8`` views)."""
        yield self.shapes
        yield self.spacings
        yield self.stats
        yield self.affines
        if self.stats_absent is not None:
            yield self.stats_absent
        yield self.patients
        yield from self.codes.values()
        for text in (self.series_ids, self.patient_ids, self.arrays):
            yield np.frombuffer(text.buffer, dtype=np.uint8)
            yield text.offsets


class SeriesRows(Sequence):
    """The records of a :class:`SeriesTable` as a read-only sequence, rebuilt on each access.

    What ``SliceIndex.rows`` / ``VolumeIndex.rows`` return, for callers in the main process (tests,
    tools); the datasets never use it in a worker.
    """

    def __init__(self, table: SeriesTable) -> None:
        self._table = table

    def __len__(self) -> int:
        return len(self._table)

    @overload
    def __getitem__(self, i: int) -> SeriesRecord: ...

    @overload
    def __getitem__(self, i: slice) -> tuple[SeriesRecord, ...]: ...

    def __getitem__(self, i: int | slice) -> SeriesRecord | tuple[SeriesRecord, ...]:
        if isinstance(i, slice):
            return tuple(self._table.row(j) for j in range(len(self))[i])
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"series {i} out of range for {n} series")
        return self._table.row(i % n)

    def __iter__(self) -> Iterator[SeriesRecord]:
        return (self._table.row(i) for i in range(len(self)))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, SeriesRows | tuple | list):
            return tuple(self) == tuple(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"SeriesRows({len(self)} series)"
