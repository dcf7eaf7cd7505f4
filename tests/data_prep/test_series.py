"""Series assembly rules on hand-made header records (no files involved)."""

from __future__ import annotations

import pytest

from data_prep.reasons import Reason
from data_prep.scan import DicomHeader, FrameInfo, ScanRecord
from data_prep.series import assemble, nifti_plan

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
SAGITTAL = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)


def rec(
    rel: str,
    z: float | None = 0.0,
    *,
    series: str = "S1",
    sop: str | None = None,
    orientation=AXIAL,
    rows: int = 8,
    echo: str = "",
    acq: str = "",
    modality: str = "CT",
    projection: bool = False,
    secondary_capture: bool = False,
) -> ScanRecord:
    frame = FrameInfo(
        position=None if z is None else (0.0, 0.0, float(z)) if orientation == AXIAL else (float(z), 0.0, 0.0),
        orientation=None if z is None else orientation,
        pixel_spacing=(1.0, 1.0),
        slice_thickness=2.0,
        spacing_between_slices=None,
        slope=1.0,
        intercept=0.0,
        split=("", echo, "", "", "", ""),
    )
    header = DicomHeader(
        sop_class="1.2.840.10008.5.1.4.1.1.2",
        sop_instance=sop or f"sop-{rel}",
        series_uid=series,
        patient_key="id:P",
        modality=modality,
        rows=rows,
        columns=8,
        photometric="MONOCHROME2",
        bits_stored=16,
        pixel_representation=1,
        has_modality_lut=False,
        acquisition_number=acq,
        projection=projection,
        secondary_capture=secondary_capture,
        enhanced=False,
        frames=(frame,),
    )
    return ScanRecord(f"0/{rel}", f"/archive/{rel}", "dicom", dicom=header)


def _plans_by_files(records):
    asm = assemble(records)
    return sorted([[s.rel for s in p.slices] for p in asm.plans]), asm.rejects


def test_two_series_in_one_folder_are_two_plans_sorted_by_position() -> None:
    records = [rec("a3", 4), rec("a1", 0), rec("a2", 2), rec("b1", 10, series="S2"), rec("b2", 13, series="S2")]
    plans, rejects = _plans_by_files(records)
    assert plans == [["0/a1", "0/a2", "0/a3"], ["0/b1", "0/b2"]] and rejects == {}


def test_duplicate_sop_instance_keeps_the_first_path() -> None:
    plans, rejects = _plans_by_files([rec("x/copy", 2, sop="same"), rec("a", 0), rec("b", 2, sop="same")])
    assert rejects == {"0/x/copy": Reason.DUPLICATE_INSTANCE}
    assert plans == [["0/a", "0/b"]]


@pytest.mark.parametrize(
    ("second", "n_plans"),
    [
        (dict(orientation=SAGITTAL), 2),
        (dict(rows=16), 2),
        (dict(echo="20"), 2),
        ({}, 1),
    ],
)
def test_series_is_split_by_orientation_matrix_and_echo(second: dict, n_plans: int) -> None:
    records = [rec(f"a{k}", 2 * k) for k in range(3)] + [rec(f"b{k}", 2 * k + 6, **second) for k in range(3)]
    asm = assemble(records)
    assert len(asm.plans) == n_plans and asm.rejects == {}


def test_repeated_positions_split_by_acquisition_number() -> None:
    records = [rec(f"a{k}", 2 * k, acq="1") for k in range(3)] + [rec(f"b{k}", 2 * k, acq="2") for k in range(3)]
    plans, rejects = _plans_by_files(records)
    assert plans == [["0/a0", "0/a1", "0/a2"], ["0/b0", "0/b1", "0/b2"]] and rejects == {}


def test_repeated_positions_without_a_separating_tag_are_rejected() -> None:
    records = [rec(f"a{k}", 2 * k) for k in range(3)] + [rec("dup", 2)]
    plans, rejects = _plans_by_files(records)
    assert plans == [] and set(rejects.values()) == {Reason.OVERLAPPING_SLICES} and len(rejects) == 4


def test_projection_images_are_one_plan_each_whatever_the_series() -> None:
    asm = assemble([rec(f"cr{k}", None, modality="CR", projection=True) for k in range(3)])
    assert [p.kind for p in asm.plans] == ["image"] * 3


def test_lone_image_without_geometry_is_an_image_but_a_stack_without_it_is_rejected() -> None:
    assert [p.kind for p in assemble([rec("one", None)]).plans] == ["image"]
    asm = assemble([rec("a", None), rec("b", None), rec("c", 0), rec("d", 2)])
    assert asm.rejects == {"0/a": Reason.MISSING_GEOMETRY, "0/b": Reason.MISSING_GEOMETRY}
    assert [[s.rel for s in p.slices] for p in asm.plans] == [["0/c", "0/d"]]


def test_nifti_patient_is_the_bids_subject_folder() -> None:
    a = nifti_plan(ScanRecord("0/ds/sub-07/anat/sub-07_T1w.nii.gz", "/x", "nifti"))
    b = nifti_plan(ScanRecord("0/ds/sub-07/func/sub-07_task-rest_bold.nii.gz", "/y", "nifti"))
    c = nifti_plan(ScanRecord("0/other/scan.nii", "/z", "nifti"))
    assert a.patient_key == b.patient_key != c.patient_key
    assert (a.modality, b.modality, c.modality) == ("MR", "MR", "OT")
