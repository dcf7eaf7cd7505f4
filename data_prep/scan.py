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

from data_prep.deid import quiet_libraries
from data_prep.nifti_meta import NiftiSidecar, nifti_of_sidecar, read_sidecar, sidecar_of_nifti
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
from data_prep.workers import worker_pool

#: Files per task sent to a scan worker: large enough to amortise pickling, small enough to balance.
SCAN_CHUNK = 128
#: Default ``--max-voxels``: the most voxels one file (or one series) may declare (512 x 512 x 1024).
DEFAULT_MAX_VOXELS = 2**28

DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
#: Modalities that never carry an image we can train on (used when the SOP class is unknown).
NON_IMAGE_MODALITIES = frozenset(
    {"SR", "PR", "KO", "RTSTRUCT", "RTPLAN", "RTDOSE", "RTRECORD", "SEG", "REG", "ECG", "HD", "DOC",
     "FID", "PLAN", "RWV", "AU", "EPS", "RESP", "BDUS", "M3D", "TEXTUREMAP", "OSS"}
)
_COLOR_PHOTOMETRIC_PREFIXES = ("RGB", "YBR", "PALETTE", "HSV", "ARGB", "CMYK")
_VRS = frozenset(
    b"AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL UN UR US UT UV"
    .split()
)


@dataclass(frozen=True, slots=True)
class FrameInfo:
    """Geometry and rescale of one frame (a classic file has exactly one).

    ``split`` holds the per-frame values that separate stacks sharing a series UID: echo number,
    echo time, temporal position, diffusion b-value, stack id (enhanced files) and diffusion
    gradient direction, as canonical strings ('' when absent).
    """

    position: tuple[float, float, float] | None
    orientation: tuple[float, float, float, float, float, float] | None
    pixel_spacing: tuple[float, float] | None  # (row spacing, column spacing) in mm
    slice_thickness: float | None
    spacing_between_slices: float | None
    slope: float
    intercept: float
    split: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class DicomHeader:
    """What series assembly and decoding need from one DICOM file (raw ids: memory only)."""

    sop_class: str
    sop_instance: str
    series_uid: str
    patient_key: str
    modality: str
    rows: int
    columns: int
    photometric: str
    bits_stored: int
    pixel_representation: int
    has_modality_lut: bool
    acquisition_number: str
    projection: bool  # a 2D projection picture (CR/DX/MG/XA/..., secondary capture): kind "image"
    secondary_capture: bool  # a Secondary Capture SOP class: its pixels are display values, never HU
    enhanced: bool  # multi-frame with per-frame functional groups
    frames: tuple[FrameInfo, ...]


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


# ----------------------------------------------------------------------------- walk


def walk(
    archives: Sequence[Path], exclude: Iterable[Path] = (), *, follow_links: bool = False
) -> Iterator[tuple[str, str, Reason | None]]:
    """Yield ``(path, rel, folder_reason)`` for every entry below the archives, sorted per folder.

    ``folder_reason`` is None for a file (regular or not: FIFOs, devices and broken links are files
    here, :func:`scan_file` classifies them). A folder stands for everything inside it and is
    yielded once with a reason instead of vanishing:

    * ``unreadable_directory``: it cannot be listed (its contents are then unknown);
    * ``directory_link``: a symbolic link to a folder that is not followed. A link whose target lies
      inside a declared archive is never followed (the target is scanned under its own path, once);
      a link leading out of the archives is followed only with ``follow_links``; a folder already
      entered (a link loop, a second link to one place) is never entered twice.

    ``exclude`` (the cache itself, say) is pruned silently.
    """
    excluded = {os.path.realpath(p) for p in exclude}
    roots = [os.path.realpath(a) for a in archives]
    visited: set[tuple[int, int]] = set()  # (device, inode) of every folder entered, across archives

    def inside_an_archive(real: str) -> bool:
        return any(real == r or real.startswith(r.rstrip(os.sep) + os.sep) for r in roots)

    for index, root in enumerate(archives):
        root = os.fspath(root)
        try:
            st = os.stat(root)
            visited.add((st.st_dev, st.st_ino))
        except OSError:
            pass
        stack = [root]
        while stack:
            dirpath = stack.pop()
            try:
                with os.scandir(dirpath) as it:
                    entries = sorted(it, key=lambda e: e.name)
            except OSError:
                yield dirpath, _rel(dirpath, root, index), Reason.UNREADABLE_DIRECTORY
                continue
            real_dir = os.path.realpath(dirpath)  # once per folder, not per file
            subdirs: list[str] = []
            for entry in entries:
                if os.path.join(real_dir, entry.name) in excluded:
                    continue
                try:
                    is_link = entry.is_symlink()
                    is_dir = entry.is_dir()  # follows links; False for a broken one
                except OSError:
                    is_link, is_dir = False, False
                if not is_dir:
                    yield entry.path, _rel(entry.path, root, index), None
                    continue
                target = os.path.realpath(entry.path)
                if target in excluded:
                    continue
                try:
                    st = os.stat(entry.path)
                    key = (st.st_dev, st.st_ino)
                except OSError:
                    yield entry.path, _rel(entry.path, root, index), Reason.UNREADABLE_DIRECTORY
                    continue
                if is_link and (inside_an_archive(target) or not follow_links):
                    yield entry.path, _rel(entry.path, root, index), Reason.DIRECTORY_LINK
                    continue
                if key in visited:  # a loop, or a second way into a folder already scanned
                    yield entry.path, _rel(entry.path, root, index), Reason.DIRECTORY_LINK
                    continue
                visited.add(key)
                subdirs.append(entry.path)
            stack.extend(reversed(subdirs))  # depth first, in name order


def _rel(path: str, root: str, index: int) -> str:
    return f"{index}/{os.path.relpath(path, root)}"


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


def sniff_dicom(head: bytes) -> str | None:
    """``"part10"`` (preamble + DICM), ``"raw"`` (a bare dataset, no preamble/meta) or None.

    A bare dataset must start with a group 0002/0008 element in either byte order with an
    explicit VR or a small implicit length; this keeps ``force=True`` away from random files.
    """
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "part10"
    if len(head) < 8:
        return None
    for order in ("little", "big"):
        group = int.from_bytes(head[0:2], order)  # type: ignore[arg-type]
        if group not in (0x0002, 0x0008):
            continue
        if head[4:6] in _VRS:
            return "raw"
        if int.from_bytes(head[4:8], order) < 0x10000:  # type: ignore[arg-type]
            return "raw"
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
        reason = content_reason(sidecar.image_type, sidecar.burned_in, secondary_capture=False,
                                allow_secondary=allow_secondary)
        if reason is not None:
            return ScanRecord(rel, path, "reject", reason)
    return ScanRecord(rel, path, "nifti", sidecar=sidecar)


# ----------------------------------------------------------------------------- header parsing


def dicom_header(
    ds: Any, max_voxels: int = DEFAULT_MAX_VOXELS, *, allow_secondary: bool = False
) -> DicomHeader | Reason:
    """Extract a :class:`DicomHeader` from a header-only dataset, or the reason it is not usable.

    Sizes are checked before anything is built per frame: Rows x Columns x NumberOfFrames above
    ``max_voxels`` is ``too_large``; an enhanced file declaring more frames than it has per-frame
    entries is ``size_mismatch`` (so a header claiming 2**31 frames costs nothing).
    """
    from pydicom.uid import UID

    meta = getattr(ds, "file_meta", None)
    sop_class = _text(ds.get("SOPClassUID")) or _text(meta.get("MediaStorageSOPClassUID") if meta else None)
    if sop_class == DICOMDIR_SOP_CLASS or "DirectoryRecordSequence" in ds:
        return Reason.DICOMDIR
    modality = _modality(ds.get("Modality"))
    sop_name = UID(sop_class).name if sop_class else ""
    known_sop = bool(sop_class) and sop_name != sop_class
    if known_sop and "Image Storage" not in sop_name:
        return Reason.NON_IMAGE_SOP
    if not known_sop and modality in NON_IMAGE_MODALITIES:
        return Reason.NON_IMAGE_SOP
    rows, columns = _int(ds.get("Rows")), _int(ds.get("Columns"))
    if not rows or not columns:
        return Reason.NO_PIXEL_DATA
    photometric = _text(ds.get("PhotometricInterpretation")).upper()
    if (_int(ds.get("SamplesPerPixel")) or 1) != 1 or photometric.startswith(_COLOR_PHOTOMETRIC_PREFIXES):
        return Reason.COLOR_IMAGE
    if _int(ds.get("BitsAllocated")) == 1:
        return Reason.UNSUPPORTED_PIXEL_FORMAT
    image_type = _texts(ds.get("ImageType"))
    secondary_capture = "Secondary Capture" in sop_name
    reason = content_reason(image_type, _text(ds.get("BurnedInAnnotation")), secondary_capture=secondary_capture,
                            allow_secondary=allow_secondary)
    if reason is not None:
        return reason
    if "MOSAIC" in {v.upper() for v in image_type}:
        return Reason.MOSAIC
    n_frames = _int(ds.get("NumberOfFrames")) or 1
    if rows < 0 or columns < 0 or n_frames < 0:
        return Reason.SIZE_MISMATCH
    if rows * columns * n_frames > max_voxels:
        return Reason.TOO_LARGE
    enhanced = "PerFrameFunctionalGroupsSequence" in ds
    if enhanced and n_frames > len(ds.PerFrameFunctionalGroupsSequence):
        return Reason.SIZE_MISMATCH
    if enhanced:
        frames = _enhanced_frames(ds, n_frames)
    elif n_frames > 1:
        return Reason.MULTIFRAME_WITHOUT_GEOMETRY
    else:
        frames = (_classic_frame(ds),)
    projection = modality in PROJECTION_MODALITIES or any(k in sop_name for k in _PROJECTION_SOP_WORDS)
    return DicomHeader(
        sop_class=sop_class,
        sop_instance=_text(ds.get("SOPInstanceUID")),
        series_uid=_text(ds.get("SeriesInstanceUID")),
        patient_key=_patient_key(ds),
        modality=modality,
        rows=rows,
        columns=columns,
        photometric=photometric or "MONOCHROME2",
        bits_stored=_int(ds.get("BitsStored")) or _int(ds.get("BitsAllocated")) or 16,
        pixel_representation=_int(ds.get("PixelRepresentation")) or 0,
        has_modality_lut="ModalityLUTSequence" in ds,
        acquisition_number=_text(ds.get("AcquisitionNumber")),
        projection=projection,
        secondary_capture=secondary_capture,
        enhanced=enhanced,
        frames=frames,
    )


def content_reason(
    image_type: Sequence[str], burned_in: str, *, secondary_capture: bool, allow_secondary: bool
) -> Reason | None:
    """Pictures refused whatever their pixels (DICOM headers and NIfTI sidecars alike).

    Localizers; anything flagged ``BurnedInAnnotation = YES``; and, unless ``allow_secondary`` or the
    header vouches ``BurnedInAnnotation = NO`` exactly, secondary captures and ImageType
    ``DERIVED\\SECONDARY`` images: screenshots and reformats most often carry patient text drawn
    into the pixels, which nothing downstream can scrub.
    """
    values = [v.strip().upper() for v in image_type]
    if {"LOCALIZER", "SCOUT"} & set(values):
        return Reason.LOCALIZER
    if burned_in.strip().upper() == "YES":  # pixels may show names: privacy first
        return Reason.BURNED_IN_ANNOTATION
    secondary = secondary_capture or values[:2] == ["DERIVED", "SECONDARY"]
    if secondary and burned_in.strip() != "NO" and not allow_secondary:
        return Reason.SECONDARY_CAPTURE
    return None


#: 2D projection modalities: every instance is its own picture (kind "image"), whatever its series.
PROJECTION_MODALITIES = frozenset({"CR", "DX", "MG", "IO", "PX", "XA", "RF", "RG", "DG"})
_PROJECTION_SOP_WORDS = ("X-Ray", "Radiography", "Secondary Capture")


def _classic_frame(ds: Any) -> FrameInfo:
    spacing = _floats(ds.get("PixelSpacing"), 2) or _floats(ds.get("ImagerPixelSpacing"), 2)
    return FrameInfo(
        position=_floats(ds.get("ImagePositionPatient"), 3),
        orientation=_floats(ds.get("ImageOrientationPatient"), 6),
        pixel_spacing=spacing,
        slice_thickness=_float(ds.get("SliceThickness")),
        spacing_between_slices=_float(ds.get("SpacingBetweenSlices")),
        slope=_rescale(ds.get("RescaleSlope"), 1.0),
        intercept=_rescale(ds.get("RescaleIntercept"), 0.0),
        split=(
            _num_key(ds.get("EchoNumbers")),
            _num_key(ds.get("EchoTime")),
            _num_key(ds.get("TemporalPositionIdentifier")),
            _num_key(ds.get("DiffusionBValue")),
            "",
            _vec_key(ds.get("DiffusionGradientOrientation")),
        ),
    )


def _enhanced_frames(ds: Any, n_frames: int) -> tuple[FrameInfo, ...]:
    """Per-frame geometry of an enhanced multi-frame file (per-frame group, else shared group)."""
    shared_seq = ds.get("SharedFunctionalGroupsSequence")
    shared = shared_seq[0] if shared_seq else None
    per = ds.PerFrameFunctionalGroupsSequence
    top_slope, top_intercept = _rescale(ds.get("RescaleSlope"), 1.0), _rescale(ds.get("RescaleIntercept"), 0.0)

    def get(item: Any, seq: str, attr: str) -> Any:
        for group in (item, shared):
            if group is None:
                continue
            s = group.get(seq)
            if s:
                v = s[0].get(attr)
                if v is not None:
                    return v
        return None

    frames = []
    for i in range(n_frames):
        item = per[i] if i < len(per) else None
        frames.append(
            FrameInfo(
                position=_floats(get(item, "PlanePositionSequence", "ImagePositionPatient"), 3),
                orientation=_floats(get(item, "PlaneOrientationSequence", "ImageOrientationPatient"), 6),
                pixel_spacing=_floats(get(item, "PixelMeasuresSequence", "PixelSpacing"), 2),
                slice_thickness=_float(get(item, "PixelMeasuresSequence", "SliceThickness")),
                spacing_between_slices=_float(get(item, "PixelMeasuresSequence", "SpacingBetweenSlices")),
                slope=_rescale(get(item, "PixelValueTransformationSequence", "RescaleSlope"), top_slope),
                intercept=_rescale(get(item, "PixelValueTransformationSequence", "RescaleIntercept"), top_intercept),
                split=(
                    "",
                    _num_key(get(item, "MREchoSequence", "EffectiveEchoTime")),
                    _num_key(get(item, "FrameContentSequence", "TemporalPositionIndex")),
                    _num_key(get(item, "MRDiffusionSequence", "DiffusionBValue")),
                    _text(get(item, "FrameContentSequence", "StackID")),
                    _gradient_key(item, shared),
                ),
            )
        )
    return tuple(frames)


def _gradient_key(item: Any, shared: Any) -> str:
    """Diffusion gradient direction of an enhanced frame (nested two sequences deep)."""
    for group in (item, shared):
        diffusion = group.get("MRDiffusionSequence") if group is not None else None
        if diffusion:
            direction = diffusion[0].get("DiffusionGradientDirectionSequence")
            if direction:
                return _vec_key(direction[0].get("DiffusionGradientOrientation"))
    return ""


def _patient_key(ds: Any) -> str:
    """Raw patient identity: PatientID, else name + birth date, else the study (one patient per study)."""
    pid = _text(ds.get("PatientID"))
    if pid:
        return "id:" + pid
    name, birth = _text(ds.get("PatientName")), _text(ds.get("PatientBirthDate"))
    if name:
        return f"name:{name}\0{birth}"
    study = _text(ds.get("StudyInstanceUID"))
    if study:
        return "study:" + study
    return "series:" + _text(ds.get("SeriesInstanceUID"))


def _text(v: Any) -> str:
    if v is None:
        return ""
    if hasattr(v, "value") and not isinstance(v, str | bytes):  # a DataElement
        v = v.value
    if isinstance(v, bytes):
        v = v.decode("latin-1")
    return str(v).strip().strip("\0").strip()


def _texts(v: Any) -> list[str]:
    if v is None:
        return []
    if isinstance(v, str | bytes):
        return [_text(x) for x in _text(v).split("\\")]
    try:
        return [_text(x) for x in v]
    except TypeError:
        return [_text(v)]


def _modality(v: Any) -> str:
    m = _text(v).upper()
    return m if m and len(m) <= 16 and all(c.isalnum() or c == "_" for c in m) else "OT"


def _float(v: Any, default: float | None = None) -> Any:
    if v is None:
        return default
    try:
        if not isinstance(v, str | bytes | int | float):
            v = v[0] if len(v) else None  # a multi-valued DS: take the first
            if v is None:
                return default
        x = float(v)
    except (TypeError, ValueError, IndexError):
        return default
    return x if x == x and abs(x) != float("inf") else default


def _rescale(v: Any, default: float) -> float:
    """RescaleSlope / RescaleIntercept: ``default`` when absent or empty, else its (first) value as a
    float, NaN and +/-Inf included; a value that is not a number is NaN. Decoding then refuses the
    file (``non_finite_values``) instead of silently storing raw values under a slope of 1 and an
    intercept of 0 (a CT whose intercept is -1024 would come out 1024 HU too bright)."""
    if v is None:
        return default
    if hasattr(v, "value") and not isinstance(v, str | bytes):  # a DataElement
        v = v.value
    if v is None or (isinstance(v, str | bytes) and not v.strip()):
        return default
    try:
        if not isinstance(v, str | bytes | int | float):
            if not len(v):
                return default
            v = v[0]  # a multi-valued DS: take the first
        return float(v)
    except (TypeError, ValueError, IndexError):
        return float("nan")


def _int(v: Any) -> int | None:
    x = _float(v)
    return int(x) if x is not None and float(x).is_integer() else None


def _floats(v: Any, n: int) -> Any:
    if v is None:
        return None
    try:
        xs = tuple(float(x) for x in v)
    except (TypeError, ValueError):
        return None
    if len(xs) != n or any(x != x or abs(x) == float("inf") for x in xs):
        return None
    return xs


def _vec_key(v: Any) -> str:
    xs = _floats(v, 3)
    return "" if xs is None else ",".join(f"{x:.4f}" for x in xs)


def _num_key(v: Any) -> str:
    """A split value as a canonical string ('' when absent) so 5, '5.0' and 5.000001 compare equal."""
    x = _float(v)
    return "" if x is None else f"{x:.6g}"


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
    See :func:`walk` for folders and links, :func:`scan_file` for files.
    """
    records: list[ScanRecord] = []

    def done(batch: list[ScanRecord]) -> None:
        records.extend(batch)
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
