"""DICOM header parsing: a header-only dataset in, a :class:`DicomHeader` or the reason it is refused out.

A classic file has one frame (:func:`_classic_frame`); an enhanced multi-frame file has one per
per-frame functional group, each value taken from its own group, else from the shared one
(:func:`_enhanced_frames`). Values are coerced defensively: a malformed element reads as absent (a
rescale value that is not a number as NaN), never as an exception. :func:`content_reason` is the
picture rule shared with NIfTI sidecars. Headers keep raw identifiers (UIDs, PatientID) in memory
only, for grouping and for keyed pseudonyms; nothing here is ever written out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from data_prep.reasons import Reason

#: Default ``--max-voxels``: the most voxels one file (or one series) may declare (512 x 512 x 1024).
DEFAULT_MAX_VOXELS = 2**28

DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
#: Modalities that never carry an image we can train on (used when the SOP class is unknown).
NON_IMAGE_MODALITIES = frozenset(
    {
        "SR",
        "PR",
        "KO",
        "RTSTRUCT",
        "RTPLAN",
        "RTDOSE",
        "RTRECORD",
        "SEG",
        "REG",
        "ECG",
        "HD",
        "DOC",
        "FID",
        "PLAN",
        "RWV",
        "AU",
        "EPS",
        "RESP",
        "BDUS",
        "M3D",
        "TEXTUREMAP",
        "OSS",
    }
)
_COLOR_PHOTOMETRIC_PREFIXES = ("RGB", "YBR", "PALETTE", "HSV", "ARGB", "CMYK")


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
    reason = content_reason(
        image_type,
        _text(ds.get("BurnedInAnnotation")),
        secondary_capture=secondary_capture,
        allow_secondary=allow_secondary,
    )
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

# ----------------------------------------------------------------------------- frames: classic and enhanced multi-frame


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


# ----------------------------------------------------------------------------- value coercion


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
