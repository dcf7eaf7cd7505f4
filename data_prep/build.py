"""Build: one series plan -> one cache entry (array + sidecar), or per-file rejects.

Runs in pool workers. A series is built once per *version*: its sidecar (written last by
:func:`medmae.data.cache.write_series`) marks it done, and a small state file written *before* the
array records the series fingerprint it was built from (a keyed hash of its plan and instances,
see :func:`data_prep.incremental.series_fingerprint`) and the files dropped while building it (a
truncated end slice, say). A rerun skips a series only when sidecar, array and a state of the same
fingerprint are all there, so a series that gained, lost or changed instances is rebuilt, never
left stale; a resumed run reports exactly what an uninterrupted run reports. Rebuilding starts by
removing the old sidecar, so a kill at any point of a rebuild leaves the series "not built".
Where the state lives and how it is read is :mod:`data_prep.state`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from data_prep.decode import (
    DeclaredSizeError,
    NonFiniteValues,
    SizeMismatch,
    StackAssembler,
    StreamTooLarge,
    compact,
    modality_values,
    read_dicom_frames,
    read_nifti,
    store_values,
)
from data_prep.deid import quiet_libraries
from data_prep.geometry import RAS_TO_LPS, check_stack, stack_affine, to_canonical
from data_prep.reasons import Reason
from data_prep.series import SeriesPlan
from data_prep.sources.base import RetrieveFailed
from data_prep.state import (  # noqa: F401 - re-exported: the state's names were importable from here
    STATE_DIRNAME,
    SeriesState,
    dropped_state_path,
    read_series_state,
    remove_series,
    series_state_path,
)
from medmae.data.cache import (
    CacheFormatError,
    SeriesRecord,
    compute_stats,
    read_sidecar,
    series_array_path,
    sidecar_path,
    write_json_atomic,
    write_series,
)

log = logging.getLogger("data_prep")


@dataclass(frozen=True)
class BuildTask:
    """Everything a worker needs to build one series; ids are already pseudonymised."""

    plan: SeriesPlan
    series_id: str
    patient_id: str
    file_ids: dict[str, str]  # rel -> file pseudonym, for the plan's files
    cache_dir: str
    fingerprint: str  # keyed hash of what the build reads (plan, SOPInstanceUIDs / NIfTI content)
    content_memo: dict[str, str] | None = None  # NIfTI: keyed stat -> keyed content, saved in the state


@dataclass(frozen=True)
class BuildResult:
    """Outcome of one task: the record when built (or found built), and rejected file ids."""

    series_id: str
    record: SeriesRecord | None
    rejects: dict[str, Reason]  # file pseudonym -> reason
    skipped: bool = False
    causes: dict[str, str] = field(default_factory=dict)  # file pseudonym -> why (for the log; no PHI)


#: Exceptions that are the user's or the interpreter's, never a file's: they still stop a run.
_NOT_A_FILE_PROBLEM = (KeyboardInterrupt, SystemExit)


def cause_of(e: BaseException) -> str:
    """A loggable cause: our size checks say what they found; anything else only its class name
    (library messages may quote header values or paths)."""
    if isinstance(e, DeclaredSizeError | RetrieveFailed):  # sizes only; a PACS error names the server only
        return str(e)
    return e.__class__.__name__


def reason_of(e: BaseException) -> Reason:
    """The reason a file whose pixels could not be read is counted under: ``too_large`` (a deflated
    dataset inflating past its budget), ``size_mismatch`` (a codestream declaring another size),
    else ``pixel_decode_failed``."""
    if isinstance(e, StreamTooLarge):
        return Reason.TOO_LARGE
    if isinstance(e, SizeMismatch):
        return Reason.SIZE_MISMATCH
    if isinstance(e, RetrieveFailed):
        return Reason(e.reason)
    return Reason.PIXEL_DECODE_FAILED


class _Rejected(Exception):
    """Internal: the whole series is rejected; ``per_file`` says why for each file."""

    def __init__(self, per_file: dict[str, Reason]) -> None:
        super().__init__("rejected")
        self.per_file = per_file


def already_built(task: BuildTask) -> BuildResult | None:
    """The result of a previous run, if the series is built from exactly this plan (resume, rerun).

    Built means: a valid sidecar, its array, and a state file whose fingerprint equals the task's.
    A series whose instances changed (another fingerprint), or built by a prep that recorded none,
    is rebuilt. So is one stored under another modality or intensity than this run decides (other
    ``--nifti-modality`` rules, or a prep that knew no sidecars). One that differs only in
    ``modality_source`` (absent before it was recorded) gets its sidecar updated.
    """
    cache = Path(task.cache_dir)
    if not sidecar_path(cache, task.series_id).is_file():
        return None
    state = read_series_state(cache, task.series_id)
    if state is None or state.fingerprint != task.fingerprint:
        return None
    try:
        record = read_sidecar(cache, task.series_id)
    except CacheFormatError:
        return None
    if not (cache / record.array).is_file():
        return None
    plan = task.plan
    if (record.modality, record.intensity) != (plan.modality, intensity_of(plan)):
        return None
    if record.modality_source != plan.modality_source:
        record = dataclasses.replace(record, modality_source=plan.modality_source)
        write_json_atomic(sidecar_path(cache, task.series_id), record.to_json())
    return BuildResult(task.series_id, record, dict(state.dropped), skipped=True)


def build_series(
    task: BuildTask,
    excluded: Mapping[str, str] | None = None,
    on_file: Callable[[str | None], None] | None = None,
) -> BuildResult:
    """Build one series into the cache. Data problems never raise (reasons; unexpected ones ->
    ``build_failed``); machine problems (disk full) do, and a rerun resumes.

    Any decoder failure, ``BaseException``s such as pyo3's ``PanicException`` included, drops the
    file as ``pixel_decode_failed``. ``excluded`` (rel -> cause) are files a supervisor already
    blamed for killing or hanging a worker: they are dropped without being opened again.
    ``on_file(rel)`` is called before each file is decoded and ``on_file(None)`` once decoding is
    over, so a supervisor knows which file a crash or a hang belongs to.
    """
    done = already_built(task)
    if done is not None:
        return done
    # A stale entry stops being "built" before anything else, so a kill mid-rebuild cannot leave the
    # old sidecar marking a new state.
    sidecar_path(Path(task.cache_dir), task.series_id).unlink(missing_ok=True)
    fid = task.file_ids
    causes: dict[str, str] = {}
    try:
        with quiet_libraries():
            array, affine, spacing, dropped = _decode(task.plan, dict(excluded or {}), on_file, causes)
        array = np.ascontiguousarray(array)
        record = _record(task, array, affine, spacing)
        if not _finite_json(record.to_json()):  # guard: the strict writers would refuse it and stop the run
            raise _Rejected({rel: Reason.NON_FINITE_VALUES for rel in task.plan.rels if rel not in dropped}
                            | dropped)
    except _Rejected as r:
        return BuildResult(
            task.series_id,
            None,
            {fid[rel]: reason for rel, reason in r.per_file.items()},
            causes={fid[rel]: c for rel, c in causes.items()},
        )
    except _NOT_A_FILE_PROBLEM:
        raise
    except BaseException as e:  # a bug guard: one odd series must not stop the run
        return BuildResult(
            task.series_id,
            None,
            {fid[rel]: Reason.BUILD_FAILED for rel in task.plan.rels},
            causes={fid[rel]: cause_of(e) for rel in task.plan.rels},
        )
    # From here on errors are the machine's (disk full, permissions): let them stop the run; a rerun resumes.
    rejects = {fid[rel]: reason for rel, reason in dropped.items()}
    state: dict[str, object] = {
        "fingerprint": task.fingerprint,
        "files": sorted(fid[rel] for rel in task.plan.rels),
        "dropped": {k: v.value for k, v in sorted(rejects.items())},
    }
    if task.content_memo is not None:
        state["content_memo"] = dict(sorted(task.content_memo.items()))
    write_json_atomic(series_state_path(Path(task.cache_dir), task.series_id), state)
    dropped_state_path(Path(task.cache_dir), task.series_id).unlink(missing_ok=True)
    write_series(Path(task.cache_dir), record, array)
    return BuildResult(task.series_id, record, rejects, causes={fid[rel]: c for rel, c in causes.items()})


def _finite_json(doc: object) -> bool:
    """Whether ``doc`` is strict JSON (no NaN/Infinity): what the cache's writers require."""
    try:
        json.dumps(doc, allow_nan=False)
    except ValueError:
        return False
    return True


def _record(task: BuildTask, array: np.ndarray, affine: np.ndarray, spacing: tuple[float, ...]) -> SeriesRecord:
    plan = task.plan
    return SeriesRecord(
        series_id=task.series_id,
        patient_id=task.patient_id,
        modality=plan.modality,
        source=plan.source,
        kind=plan.kind,
        array=series_array_path(task.series_id),
        shape=tuple(int(s) for s in array.shape),  # type: ignore[arg-type]
        spacing=tuple(float(s) for s in spacing),  # type: ignore[arg-type]
        dtype=str(array.dtype),
        intensity=intensity_of(plan),
        stats=compute_stats(array),
        affine=tuple(tuple(float(v) for v in row) for row in affine),
        modality_source=plan.modality_source,
    )


def intensity_of(plan: SeriesPlan) -> str:
    """The record's ``intensity``: ``HU`` exactly when the plan stores Hounsfield units."""
    return "HU" if plan.hu else "raw"


# ----------------------------------------------------------------------------- decoding per source


_Decoded = tuple[np.ndarray, np.ndarray, tuple[float, ...], dict[str, Reason]]
_OnFile = Callable[[str | None], None] | None


def _decode(plan: SeriesPlan, excluded: dict[str, str], on_file: _OnFile, causes: dict[str, str]) -> _Decoded:
    """-> (array (Z, Y, X) in storage dtype, affine, spacing (Z, Y, X), files dropped on the way).

    ``causes`` collects, per dropped file, why its pixels did not decode.
    """
    if plan.source == "nifti":
        return _decode_nifti(plan, excluded, on_file, causes)
    return _decode_dicom(plan, excluded, on_file, causes)


def _decode_nifti(plan: SeriesPlan, excluded: dict[str, str], on_file: _OnFile, causes: dict[str, str]) -> _Decoded:
    """One NIfTI file; a rejection covers its JSON sidecar too (the sidecar shares the NIfTI's fate)."""
    rel = plan.slices[0].rel

    def rejected(reason: Reason) -> _Rejected:
        return _Rejected(dict.fromkeys(plan.rels, reason))

    if rel in excluded:
        causes[rel] = excluded[rel]
        raise rejected(Reason.PIXEL_DECODE_FAILED)
    if on_file is not None:
        on_file(rel)
    try:
        data, affine_ras = read_nifti(plan.slices[0].path)
    except _NOT_A_FILE_PROBLEM:
        raise
    except BaseException as e:
        causes[rel] = cause_of(e)
        raise rejected(reason_of(e)) from e
    if on_file is not None:
        on_file(None)
    if data.dtype.kind not in "iuf" or data.dtype.names is not None:
        raise rejected(Reason.UNSUPPORTED_NIFTI)
    try:
        values = store_values(data, hu=plan.hu)
    except NonFiniteValues as e:
        raise rejected(Reason.NON_FINITE_VALUES) from e
    try:
        array, affine, spacing = to_canonical(values, RAS_TO_LPS @ affine_ras)
    except ValueError as e:
        raise rejected(Reason.UNSUPPORTED_NIFTI) from e
    return array, affine, spacing, {}


def _decode_dicom(plan: SeriesPlan, excluded: dict[str, str], on_file: _OnFile, causes: dict[str, str]) -> _Decoded:
    frames_of: dict[str, list[int]] = defaultdict(list)
    path_of: dict[str, str] = {}
    for s in plan.slices:
        frames_of[s.rel].append(s.frame)
        path_of[s.rel] = s.path

    dropped: dict[str, Reason] = {}
    values: dict[tuple[str, int], tuple[np.ndarray, bool, float, float]] = {}  # compacted slices
    monochrome1 = plan.photometric == "MONOCHROME1"
    slices_of = defaultdict(list)
    for s in plan.slices:
        slices_of[s.rel].append(s)
    for rel, frames in frames_of.items():
        if rel in excluded:  # it crashed or hung a worker before: never opened again
            dropped[rel] = Reason.PIXEL_DECODE_FAILED
            causes[rel] = excluded[rel]
            continue
        if on_file is not None:
            on_file(rel)
        try:
            raw, ds = read_dicom_frames(path_of[rel], frames, plan.rows, plan.columns)
        except _NOT_A_FILE_PROBLEM:
            raise
        except BaseException as e:  # pyo3 PanicException is a BaseException
            if isinstance(e, RetrieveFailed):  # the PACS failed, not the file: no partial series, a rerun pulls it
                causes[rel] = cause_of(e)
                raise _Rejected(dict.fromkeys(plan.rels, reason_of(e))) from None
            dropped[rel] = reason_of(e)
            causes[rel] = cause_of(e)
            continue
        lut = ds if plan.has_modality_lut else None
        for s in slices_of[rel]:
            v = modality_values(
                raw[s.frame],
                s.slope,
                s.intercept,
                lut_dataset=lut,
                monochrome1=monochrome1,
                bits_stored=plan.bits_stored,
                pixel_representation=plan.pixel_representation,
            )
            try:  # finite as stored: after the rescale (NaN/Inf slope or intercept) and the float32 cast
                values[(rel, s.frame)] = compact(v)
            except NonFiniteValues:
                dropped[rel] = Reason.NON_FINITE_VALUES
                break
        if dropped.get(rel) is Reason.NON_FINITE_VALUES:
            for s in slices_of[rel]:
                values.pop((rel, s.frame), None)
    if on_file is not None:
        on_file(None)

    keep = [s for s in plan.slices if s.rel not in dropped]
    if not keep:
        raise _Rejected(dropped)
    slice_spacing = plan.slice_spacing
    if dropped and plan.kind == "volume" and len(keep) > 1:
        assert plan.orientation is not None and plan.pixel_spacing is not None
        check = check_stack([s.position for s in keep], plan.orientation, plan.pixel_spacing)  # type: ignore[misc]
        if check.reason is not None:
            raise _Rejected({**dropped, **{s.rel: check.reason for s in keep}})
        keep = [keep[i] for i in check.order]
        slice_spacing = check.spacing

    assembler = StackAssembler()
    for s in keep:
        assembler.add_compact(values.pop((s.rel, s.frame)))
    native = assembler.finish(plan.hu)  # (k, row j, column i)

    if plan.kind == "image":
        row_sp, col_sp = plan.pixel_spacing or (1.0, 1.0)
        affine = np.diag([float(col_sp), float(row_sp), 1.0, 1.0])
        return native, affine, (1.0, float(row_sp), float(col_sp)), dropped

    assert plan.orientation is not None and plan.pixel_spacing is not None and keep[0].position is not None
    if slice_spacing is None:  # a single slice: its nominal slab width, else 1 mm
        slice_spacing = plan.nominal_spacing or 1.0
    affine_native = stack_affine(keep[0].position, plan.orientation, plan.pixel_spacing, slice_spacing)
    array, affine, spacing = to_canonical(native.transpose(2, 1, 0), affine_native)
    return array, affine, spacing, dropped
