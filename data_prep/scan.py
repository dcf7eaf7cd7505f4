"""Scan: walk the archive and read one header record per file, never stopping on a bad file.

DICOM is recognised by content (preamble ``DICM`` or a plausible first data element), not by
extension; NIfTI by ``.nii`` / ``.nii.gz``, and ``<stem>.json`` beside one as its sidecar (read with
the NIfTI, :mod:`data_prep.nifti_meta`). Headers are read with ``stop_before_pixels`` in a process
pool, in chunks, and every failure becomes a reject record with a reason code. What the decoded
stream itself says about the size is read too (:mod:`data_prep.streams`): a deflated file is
inflated under a budget, the first JPEG / JPEG-LS / JPEG 2000 codestream header is compared with
Rows x Columns, and of a NIfTI only the fixed header is read (never its extensions). Records keep raw
identifiers (UIDs, PatientID) in memory only, for grouping and for keyed pseudonyms; nothing here
is ever written out.

Walking and content sniffing live in :mod:`data_prep.walk`, header parsing (classic and enhanced
multi-frame) in :mod:`data_prep.headers`; this module reads one file and runs the pool. Their public
names are importable from here too.
"""

from __future__ import annotations

import math
import os
import stat
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data_prep.compact import Compactor
from data_prep.deid import quiet_libraries
from data_prep.headers import (
    DEFAULT_MAX_VOXELS,
    DICOMDIR_SOP_CLASS,
    NON_IMAGE_MODALITIES,
    PROJECTION_MODALITIES,
    DicomHeader,
    FrameInfo,
    content_reason,
    dicom_header,
)
from data_prep.nifti_meta import NiftiSidecar, nifti_of_sidecar, read_sidecar, sidecar_of_nifti
from data_prep.pool import worker_pool
from data_prep.reasons import Reason
from data_prep.streams import (
    NON_PIXEL_ALLOWANCE,
    DicomRead,
    SizeMismatch,
    StreamTooLarge,
    check_codestream,
    codestream_kind,
    first_codestream_size,
    is_cifti,
    read_dicom,
    read_nifti_header,
)
from data_prep.walk import sniff_dicom, walk

__all__ = [
    "DEFAULT_MAX_VOXELS",
    "DICOMDIR_SOP_CLASS",
    "NON_IMAGE_MODALITIES",
    "PROJECTION_MODALITIES",
    "SCAN_CHUNK",
    "DicomHeader",
    "FrameInfo",
    "ScanRecord",
    "content_reason",
    "dicom_header",
    "scan_archives",
    "scan_batch",
    "scan_file",
    "sniff_dicom",
    "walk",
]

#: Files per task sent to a scan worker: large enough to amortise pickling, small enough to balance.
SCAN_CHUNK = 128


@dataclass(frozen=True, slots=True)
class ScanRecord:
    """One input file (or unreadable folder): where it is, what it is, or why it is rejected.

    ``rel`` (``"<archive index>/<path relative to the archive>"``) is the stable key the file's
    pseudonym is derived from; ``path`` is only used to open the file.
    """

    rel: str
    path: str
    kind: str  # "dicom" | "nifti" | "sidecar" | "reject"
    reason: Reason | None = None
    dicom: DicomHeader | None = None
    is_directory: bool = False
    sidecar: NiftiSidecar | None = None  # kind "nifti": what its JSON sidecar says (None: it has none)
    nifti_rel: str | None = None  # kind "sidecar": the rel of the NIfTI this JSON file describes


# ----------------------------------------------------------------------------- per-file read


def scan_file(
    path: str, rel: str, max_voxels: int = DEFAULT_MAX_VOXELS, *, allow_secondary: bool = False
) -> ScanRecord:
    """Classify one file and read its header; any failure becomes a reject record.

    Only regular files are opened (a FIFO would block the scan, a device could be endless or have
    side effects); a file that cannot be opened is ``unreadable_file`` whatever its extension. A
    header declaring more than ``max_voxels`` voxels is ``too_large`` before anything is allocated.
    ``allow_secondary`` keeps secondary captures (see :func:`content_reason`). A ``<stem>.json``
    beside a ``<stem>.nii[.gz]`` is that NIfTI's sidecar (kind ``"sidecar"``: read with the NIfTI).
    """
    try:
        st = os.stat(path)
    except OSError:
        return ScanRecord(rel, path, "reject", Reason.UNREADABLE_FILE)
    if not stat.S_ISREG(st.st_mode):
        return ScanRecord(rel, path, "reject", Reason.NOT_A_REGULAR_FILE)
    if st.st_size == 0:
        return ScanRecord(rel, path, "reject", Reason.EMPTY_FILE)
    try:  # O_NONBLOCK + fstat: a file swapped for a FIFO after the stat still cannot block us
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        f = os.fdopen(fd, "rb")
    except OSError:
        return ScanRecord(rel, path, "reject", Reason.UNREADABLE_FILE)
    with f:  # the DICOM header is read from this very file object
        try:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                return ScanRecord(rel, path, "reject", Reason.NOT_A_REGULAR_FILE)
            head = f.read(132)
        except OSError:
            return ScanRecord(rel, path, "reject", Reason.UNREADABLE_FILE)
        lower = os.path.basename(path).lower()
        if lower.endswith((".nii", ".nii.gz")):
            return _scan_nifti(path, rel, max_voxels, allow_secondary)
        if lower == "dicomdir":
            return ScanRecord(rel, path, "reject", Reason.DICOMDIR)
        nifti = nifti_of_sidecar(path)
        if nifti is not None:
            name = os.path.basename(path)
            return ScanRecord(rel, path, "sidecar", nifti_rel=rel[: len(rel) - len(name)] + os.path.basename(nifti))
        kind = sniff_dicom(head)
        if kind is None:
            return ScanRecord(rel, path, "reject", Reason.NOT_RECOGNISED)
        return _scan_dicom(f, rel, path, kind, max_voxels, allow_secondary)


def _scan_dicom(f: Any, rel: str, path: str, kind: str, max_voxels: int, allow_secondary: bool) -> ScanRecord:
    """Header (and, for deflated files, inflated size; for JPEG/JPEG-LS/JPEG 2000, the first frame's
    codestream size) of a file recognised as DICOM, or why it is rejected."""
    try:
        f.seek(0)
        read = read_dicom(f, force=kind == "raw", header_only=True, max_voxels=max_voxels)
        header_or_reason = dicom_header(read.ds, max_voxels, allow_secondary=allow_secondary)
        if isinstance(header_or_reason, DicomHeader):
            header_or_reason = _codestream_reason(read, header_or_reason) or header_or_reason
    except StreamTooLarge:  # a deflated dataset inflating past its budget: nothing more was inflated
        return ScanRecord(rel, path, "reject", Reason.TOO_LARGE)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException:  # a broken header must not stop the scan (BaseException: pyo3 panics too)
        return ScanRecord(rel, path, "reject", Reason.DICOM_UNREADABLE)
    if isinstance(header_or_reason, Reason):
        if header_or_reason is Reason.NO_PIXEL_DATA and kind == "raw":
            header_or_reason = Reason.NOT_RECOGNISED  # a lucky first tag, not DICOM after all
        return ScanRecord(rel, path, "reject", header_or_reason)
    return ScanRecord(rel, path, "dicom", dicom=header_or_reason)


def _codestream_reason(read: DicomRead, header: DicomHeader) -> Reason | None:
    """``size_mismatch`` when the first frame's JPEG / JPEG-LS / JPEG 2000 codestream declares another
    width, height or number of components than the header (a 3.5 KB file can claim 60000 x 60000
    there). A layout the scan cannot follow is left to the build, which checks every frame before
    decoding and never decodes a frame without a readable codestream header."""
    kind = codestream_kind(read.ds.file_meta.get("TransferSyntaxUID", ""))
    if kind is None or read.pixel_tell is None:
        return None
    try:
        size = first_codestream_size(read.stream, read.pixel_tell)
    except OSError:
        return None
    if size is None:
        return None
    try:
        check_codestream(kind, size, header.rows, header.columns, 1)  # colour is refused before
    except SizeMismatch:
        return Reason.SIZE_MISMATCH
    return None


def _scan_nifti(path: str, rel: str, max_voxels: int, allow_secondary: bool) -> ScanRecord:
    """Only the fixed-size header is read (never ``nib.load``, which reads every header extension:
    a ``.nii.gz`` can claim gigabytes of them)."""
    import numpy as np

    try:
        with quiet_libraries():
            header = read_nifti_header(path)
            dtype = header.get_data_dtype()
            shape = header.get_data_shape()
            affine = header.get_best_affine()
            offset = int(header.get_data_offset())
    except Exception:
        return ScanRecord(rel, path, "reject", Reason.NIFTI_UNREADABLE)
    if is_cifti(header):  # CIFTI-2 and friends are matrices
        return ScanRecord(rel, path, "reject", Reason.UNSUPPORTED_NIFTI)
    if dtype.names is not None or dtype.kind == "V":
        return ScanRecord(rel, path, "reject", Reason.COLOR_IMAGE)  # RGB24 / RGBA32
    if dtype.kind == "c":
        return ScanRecord(rel, path, "reject", Reason.UNSUPPORTED_NIFTI)
    if len(shape) < 2 or any(s < 1 for s in shape) or any(s != 1 for s in shape[4:]):
        return ScanRecord(rel, path, "reject", Reason.UNSUPPORTED_NIFTI)
    if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        return ScanRecord(rel, path, "reject", Reason.UNSUPPORTED_NIFTI)
    if math.prod(int(s) for s in shape[:3]) > max_voxels:  # only the first volume is ever read
        return ScanRecord(rel, path, "reject", Reason.TOO_LARGE)
    if offset > NON_PIXEL_ALLOWANCE:  # header extensions larger than any image's: never inflated
        return ScanRecord(rel, path, "reject", Reason.TOO_LARGE)
    sidecar_path = sidecar_of_nifti(path)
    sidecar = read_sidecar(sidecar_path) if sidecar_path is not None else None
    if sidecar is not None:  # a converted localizer or screenshot is refused as its DICOM would be
        reason = content_reason(
            sidecar.image_type, sidecar.burned_in, secondary_capture=False, allow_secondary=allow_secondary
        )
        if reason is not None:
            return ScanRecord(rel, path, "reject", reason)
    return ScanRecord(rel, path, "nifti", sidecar=sidecar)


# ----------------------------------------------------------------------------- pool driver


def scan_batch(
    items: Sequence[tuple[str, str]], max_voxels: int = DEFAULT_MAX_VOXELS, allow_secondary: bool = False
) -> list[ScanRecord]:
    """Worker entry point: scan a chunk of files with library chatter silenced."""
    with quiet_libraries():
        return [scan_file(path, rel, max_voxels, allow_secondary=allow_secondary) for path, rel in items]


def scan_archives(
    archives: Sequence[Path],
    *,
    workers: int = 1,
    exclude: Iterable[Path] = (),
    on_progress: Callable[[int], None] | None = None,
    max_voxels: int = DEFAULT_MAX_VOXELS,
    follow_links: bool = False,
    allow_secondary: bool = False,
) -> list[ScanRecord]:
    """Scan every file below ``archives``; one record per file (and per folder not entered), sorted by rel.

    With ``workers > 1`` header reads run in a process pool, ``SCAN_CHUNK`` files per task, while the
    walk goes on; at most ``4 * workers`` chunks are in flight so memory stays flat on huge trees.
    Records are kept compact as they arrive (:class:`~data_prep.compact.Compactor`).
    See :func:`walk` for folders and links, :func:`scan_file` for files.
    """
    records: list[ScanRecord] = []
    compact = Compactor().record  # the values a series' files repeat are held once (issue 20)

    def done(batch: list[ScanRecord]) -> None:
        records.extend(compact(r) for r in batch)
        if on_progress is not None:
            on_progress(len(batch))

    def chunks() -> Iterator[list[tuple[str, str]]]:
        chunk: list[tuple[str, str]] = []
        for path, rel, folder_reason in walk(archives, exclude, follow_links=follow_links):
            if folder_reason is not None:
                records.append(ScanRecord(rel, path, "reject", folder_reason, is_directory=True))
                continue
            chunk.append((path, rel))
            if len(chunk) >= SCAN_CHUNK:
                yield chunk
                chunk = []
        if chunk:
            yield chunk

    if workers <= 1:
        for chunk in chunks():
            done(scan_batch(chunk, max_voxels, allow_secondary))
    else:
        with worker_pool(workers) as pool:
            pending: set[Future[list[ScanRecord]]] = set()
            for chunk in chunks():
                pending.add(pool.submit(scan_batch, chunk, max_voxels, allow_secondary))
                if len(pending) >= 4 * workers:
                    finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for fut in finished:
                        done(fut.result())
            for fut in pending:
                done(fut.result())
    records.sort(key=lambda r: r.rel)
    return records
