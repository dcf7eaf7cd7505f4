"""Series assembly: header records in, validated series plans (and per-file rejects) out.

Pure functions over :class:`~data_prep.scan.ScanRecord` — no I/O — so every rule here is unit-tested
on hand-made records. The rules follow dcm2niix where it is right and refuse where MONAI's folder
reader silently goes wrong (DESIGN.md section 3):

1. duplicate SOPInstanceUIDs are dropped (first in archive-path order is kept);
2. 2D projection pictures (CR/DX/MG/XA/..., secondary captures) and lone images without geometry
   become one ``image`` each;
3. classic files are grouped by SeriesInstanceUID, then split by orientation, matrix size, pixel
   spacing, echo number/time, temporal position, diffusion b-value and gradient; a split that still has two
   slices at one position is split by AcquisitionNumber when that separates them;
4. each enhanced multi-frame file is split the same way over its frames (plus StackID);
5. every stack is sorted along the slice normal and checked (:func:`~data_prep.geometry.check_stack`);
6. a NIfTI file is one series; its JSON sidecar joins its plan (accounted with it) and its modality
   is decided by :func:`~data_prep.nifti_meta.nifti_modality`.

Whether a plan's values are Hounsfield units is decided once, here (:func:`stores_hu`).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from data_prep.geometry import StackCheck, check_stack, orientation_key, spacing_key, valid_orientation
from data_prep.headers import DicomHeader, FrameInfo
from data_prep.nifti_meta import ModalityDecision, ModalityRule, nifti_modality
from data_prep.reasons import Reason
from data_prep.scan import ScanRecord


@dataclass(frozen=True, slots=True)
class SliceRef:
    """One slice of a plan: which file (and frame of it) and its geometry/rescale."""

    rel: str
    path: str
    frame: int
    position: tuple[float, float, float] | None
    slope: float
    intercept: float


@dataclass(frozen=True)
class SeriesPlan:
    """A series to build. ``key`` and ``patient_key`` are raw identities (UIDs, IDs): they only feed
    the keyed pseudonyms and are never written; volume slices are in ascending order along the normal."""

    key: str
    patient_key: str
    source: str  # "dicom" | "nifti"
    kind: str  # "volume" | "image"
    modality: str
    slices: tuple[SliceRef, ...]
    orientation: tuple[float, ...] | None = None
    pixel_spacing: tuple[float, float] | None = None
    slice_spacing: float | None = None  # from the positions; None for a single slice
    nominal_spacing: float | None = None  # SpacingBetweenSlices, else SliceThickness: single slices only
    rows: int = 0
    columns: int = 0
    photometric: str = "MONOCHROME2"
    bits_stored: int = 16
    pixel_representation: int = 0
    has_modality_lut: bool = False
    hu: bool = False  # the values are Hounsfield units (:func:`stores_hu`): storage dtype and ``intensity``
    modality_source: str = "dicom"  # one of medmae.data.cache.MODALITY_SOURCES
    sidecar_rel: str | None = None  # a NIfTI's JSON sidecar: never read at build, accounted with the plan

    @property
    def rels(self) -> tuple[str, ...]:
        """Distinct files of the plan, in slice order, then a NIfTI's sidecar: each shares the plan's fate."""
        files = tuple(dict.fromkeys(s.rel for s in self.slices))
        return files + (self.sidecar_rel,) if self.sidecar_rel is not None else files


@dataclass
class Assembly:
    """Output of :func:`assemble`: plans to build, files rejected on the way (rel -> reason), and
    warnings worth a log line (rel -> message; the message holds no path and no header text)."""

    plans: list[SeriesPlan]
    rejects: dict[str, Reason]
    warnings: list[tuple[str, str]] = field(default_factory=list)


def stores_hu(modality: str, secondary_capture: bool) -> bool:
    """CT values are Hounsfield units, except a Secondary Capture's: its pixels are display values
    (a screenshot of a window), whatever its Modality says. A CT Image Storage reformat
    (ImageType DERIVED\\SECONDARY, kept with ``--allow-secondary``) is still HU."""
    return modality == "CT" and not secondary_capture


# One slice candidate while grouping: (record, frame index, frame info).
_Cand = tuple[ScanRecord, int, FrameInfo]


def assemble(records: Iterable[ScanRecord], nifti_rules: Sequence[ModalityRule] = ()) -> Assembly:
    """Turn scan records into series plans; every DICOM/NIfTI/sidecar record ends in a plan or in ``rejects``.

    ``nifti_rules`` are the ``--nifti-modality`` rules (first match wins).
    """
    records = sorted(records, key=lambda r: r.rel)
    plans: list[SeriesPlan] = []
    rejects: dict[str, Reason] = {}
    warnings: list[tuple[str, str]] = []
    seen_sop: set[str] = set()
    classic: dict[str, list[ScanRecord]] = defaultdict(list)
    sidecars = _pair_sidecars(records, rejects)

    for rec in records:
        if rec.kind == "nifti":
            decision = nifti_modality(rec.rel, rec.path, rec.sidecar, nifti_rules)
            plans.append(nifti_plan(rec, decision, sidecars.get(rec.rel)))
            warnings += _nifti_warnings(rec, decision)
            continue
        if rec.kind != "dicom" or rec.dicom is None:
            continue
        h = rec.dicom
        if h.sop_instance:
            if h.sop_instance in seen_sop:
                rejects[rec.rel] = Reason.DUPLICATE_INSTANCE
                continue
            seen_sop.add(h.sop_instance)
        if h.enhanced:
            _assemble_enhanced(rec, plans, rejects)
        elif h.projection:
            plans.append(_image_plan(rec))
        else:
            classic[h.series_uid or "file:" + rec.rel].append(rec)

    for series_uid in sorted(classic):
        _assemble_classic(series_uid, classic[series_uid], plans, rejects)
    plans.sort(key=lambda p: p.key)
    return Assembly(plans, rejects, warnings)


def _pair_sidecars(records: Sequence[ScanRecord], rejects: dict[str, Reason]) -> dict[str, str]:
    """NIfTI rel -> its sidecar's rel, for NIfTI files that passed the scan. The sidecar of a NIfTI the
    scan rejected is ``sidecar_of_rejected_nifti``; one whose NIfTI vanished from the walk is ``not_recognised``."""
    kind_of = {r.rel: r.kind for r in records}
    paired: dict[str, str] = {}
    for rec in records:
        if rec.kind != "sidecar" or rec.nifti_rel is None:
            continue
        owner = kind_of.get(rec.nifti_rel)
        if owner == "nifti":
            paired[rec.nifti_rel] = rec.rel
        else:
            rejects[rec.rel] = Reason.SIDECAR_OF_REJECTED_NIFTI if owner is not None else Reason.NOT_RECOGNISED
    return paired


def _nifti_warnings(rec: ScanRecord, decision: ModalityDecision) -> list[tuple[str, str]]:
    """A sidecar ignored (in part), or a rule overriding its Modality: worth telling, never fatal."""
    out = []
    if rec.sidecar is not None and rec.sidecar.problem is not None:
        out.append((rec.rel, f"its JSON sidecar is ignored in part or whole: {rec.sidecar.problem}"))
    if decision.overridden is not None:
        out.append((rec.rel, f"--nifti-modality says {decision.modality}, its JSON sidecar says "
                             f"{decision.overridden}: {decision.modality} is used"))
    return out


def nifti_plan(rec: ScanRecord, decision: ModalityDecision | None = None, sidecar_rel: str | None = None) -> SeriesPlan:
    """A NIfTI file is one series; its patient is its BIDS ``sub-*`` folder if any, else the file.

    ``decision`` defaults to what the file's own sidecar and name say (no ``--nifti-modality`` rules).
    """
    decision = decision or nifti_modality(rec.rel, rec.path, rec.sidecar)
    parts = rec.rel.split("/")
    subject = next((i for i, p in enumerate(parts[1:-1], start=1) if p.startswith("sub-")), None)
    patient = "nifti-subject:" + "/".join(parts[: subject + 1]) if subject is not None else "nifti-file:" + rec.rel
    return SeriesPlan(
        key="nifti:" + rec.rel,
        patient_key=patient,
        source="nifti",
        kind="volume",
        modality=decision.modality,
        slices=(SliceRef(rec.rel, rec.path, 0, None, 1.0, 0.0),),
        hu=stores_hu(decision.modality, secondary_capture=False),  # a NIfTI carries no SOP class
        modality_source=decision.source,
        sidecar_rel=sidecar_rel,
    )


def _common(h: DicomHeader) -> dict:
    return dict(
        source="dicom",
        hu=stores_hu(h.modality, h.secondary_capture),
        modality=h.modality,
        rows=h.rows,
        columns=h.columns,
        photometric=h.photometric,
        bits_stored=h.bits_stored,
        pixel_representation=h.pixel_representation,
        has_modality_lut=h.has_modality_lut,
    )


def _image_plan(rec: ScanRecord, frame: int = 0) -> SeriesPlan:
    h = rec.dicom
    assert h is not None
    f = h.frames[frame]
    return SeriesPlan(
        key="image:" + (h.sop_instance or rec.rel),
        patient_key=h.patient_key,
        kind="image",
        slices=(SliceRef(rec.rel, rec.path, frame, None, f.slope, f.intercept),),
        pixel_spacing=f.pixel_spacing,
        **_common(h),
    )


def _has_geometry(f: FrameInfo) -> bool:
    return f.position is not None and f.pixel_spacing is not None and valid_orientation(f.orientation)


def _split_key(h: DicomHeader, f: FrameInfo) -> tuple:
    assert f.orientation is not None and f.pixel_spacing is not None
    return (orientation_key(f.orientation), h.rows, h.columns, spacing_key(f.pixel_spacing), f.split)


def _assemble_classic(
    series_uid: str, recs: list[ScanRecord], plans: list[SeriesPlan], rejects: dict[str, Reason]
) -> None:
    with_geometry: list[_Cand] = []
    without: list[ScanRecord] = []
    for rec in recs:
        assert rec.dicom is not None
        frame = rec.dicom.frames[0]
        if _has_geometry(frame):
            with_geometry.append((rec, 0, frame))
        else:
            without.append(rec)
    if len(recs) == 1 and without:
        plans.append(_image_plan(without[0]))  # a lone picture without geometry is a 2D image
        return
    for rec in without:
        rejects[rec.rel] = Reason.MISSING_GEOMETRY
    groups: dict[tuple, list[_Cand]] = defaultdict(list)
    for cand in with_geometry:
        assert cand[0].dicom is not None
        groups[_split_key(cand[0].dicom, cand[2])].append(cand)
    for key in sorted(groups, key=repr):
        _add_stacks(f"classic:{series_uid}\0{key!r}", groups[key], plans, rejects, allow_acquisition_split=True)


def _assemble_enhanced(rec: ScanRecord, plans: list[SeriesPlan], rejects: dict[str, Reason]) -> None:
    h = rec.dicom
    assert h is not None
    if not all(_has_geometry(f) for f in h.frames):
        if len(h.frames) == 1:
            plans.append(_image_plan(rec))
        else:
            rejects[rec.rel] = Reason.MULTIFRAME_WITHOUT_GEOMETRY
        return
    groups: dict[tuple, list[_Cand]] = defaultdict(list)
    for i, f in enumerate(h.frames):
        groups[_split_key(h, f)].append((rec, i, f))
    for key in sorted(groups, key=repr):
        _add_stacks(
            f"enhanced:{h.series_uid}\0{h.sop_instance or rec.rel}\0{key!r}",
            groups[key],
            plans,
            rejects,
            allow_acquisition_split=False,
        )
    if len(groups) > 1:
        # One file feeding several stacks: if any stack failed, the file is already rejected; a file
        # is accounted once, so drop it from the others rather than half-build it.
        if rec.rel in rejects:
            plans[:] = [p for p in plans if rec.rel not in p.rels]


def _add_stacks(
    key: str,
    cands: list[_Cand],
    plans: list[SeriesPlan],
    rejects: dict[str, Reason],
    *,
    allow_acquisition_split: bool,
) -> None:
    """Validate one split group as a stack; on overlap, try splitting by AcquisitionNumber first."""
    cands = sorted(cands, key=lambda c: (c[0].rel, c[1]))
    result = _check(cands)
    if result.reason is Reason.OVERLAPPING_SLICES and allow_acquisition_split:
        by_acq: dict[str, list[_Cand]] = defaultdict(list)
        for c in cands:
            assert c[0].dicom is not None
            by_acq[c[0].dicom.acquisition_number].append(c)
        if len(by_acq) > 1 and all(_check(g).reason is not Reason.OVERLAPPING_SLICES for g in by_acq.values()):
            for acq in sorted(by_acq):
                _add_stacks(f"{key}\0acq={acq}", by_acq[acq], plans, rejects, allow_acquisition_split=False)
            return
    if result.reason is not None:
        for c in cands:
            rejects[c[0].rel] = result.reason
        return
    plans.append(plan_from_candidates(key, [cands[i] for i in result.order], result.spacing))


def _check(cands: Sequence[_Cand]) -> StackCheck:
    f0 = cands[0][2]
    assert f0.orientation is not None and f0.pixel_spacing is not None
    return check_stack([c[2].position for c in cands], f0.orientation, f0.pixel_spacing)  # type: ignore[misc]


def plan_from_candidates(key: str, ordered: Sequence[_Cand], slice_spacing: float | None) -> SeriesPlan:
    """A volume plan from slices already in stack order."""
    rec0, _, f0 = ordered[0]
    h = rec0.dicom
    assert h is not None
    return SeriesPlan(
        key=key,
        patient_key=h.patient_key,
        kind="volume",
        slices=tuple(SliceRef(r.rel, r.path, i, f.position, f.slope, f.intercept) for r, i, f in ordered),
        orientation=f0.orientation,
        pixel_spacing=f0.pixel_spacing,
        slice_spacing=slice_spacing,
        nominal_spacing=_nominal_spacing(f0),
        **_common(h),
    )


def _nominal_spacing(f: FrameInfo) -> float | None:
    """Slab width of a lone slice, as dcm2niix takes it: SpacingBetweenSlices, else SliceThickness."""
    for v in (f.spacing_between_slices, f.slice_thickness):
        if v is not None and v > 0:
            return float(v)
    return None
