"""Series selection and the sampling policy (no array is read)."""

from __future__ import annotations

import numpy as np
import pytest

from medmae.data.index import SliceIndex, plane_geometry, select_series, series_weights
from medmae.data.sampler import EpochWeightedSampler
from tests.data.conftest import shape_row


def test_select_series_counts_each_drop_reason() -> None:
    rows = [
        shape_row("ct", (10, 64, 64)),
        shape_row("mr", (10, 64, 64), modality="MR"),
        shape_row("xr", (1, 80, 60), modality="DX", kind="image"),
        shape_row("tiny", (10, 16, 64)),
        shape_row("single", (1, 64, 64)),
        shape_row("thick", (10, 64, 64), spacing=(5.0, 0.8, 0.8)),
        shape_row("valct", (10, 64, 64), split="val"),
    ]
    axial = select_series(rows, split="train", min_size=32, min_slices=2)
    assert [r.series_id for r in axial.rows] == ["ct", "mr", "xr", "thick"]
    assert axial.dropped == {"min_size": 1, "min_slices": 1}

    ct_only = select_series(rows, split="train", modalities=["ct"], include_images=False)
    assert [r.series_id for r in ct_only.rows] == ["ct", "tiny", "single", "thick"]
    assert ct_only.dropped == {"modality": 2}

    no_images = select_series(rows, split="train", include_images=False)
    assert no_images.dropped["image"] == 1

    sagittal = select_series(rows, split="train", axis="sagittal", min_size=8, max_anisotropy=2.0)
    # the 5 mm / 0.8 mm series is anisotropic sagittally; the X-ray is kept as its single plane;
    # the 1-slice volume has sagittal planes 1 pixel tall (min_size)
    assert "thick" not in [r.series_id for r in sagittal.rows]
    assert sagittal.dropped["anisotropy"] == 1
    assert "xr" in [r.series_id for r in sagittal.rows]

    # a sagittal acquisition (few thick slices along X) has stretched axial planes: dropped axially too
    sag_stack = shape_row("sagstack", (64, 64, 12), spacing=(0.8, 0.8, 5.0))
    axial_of_sag = select_series([sag_stack], split="train", min_size=8, max_anisotropy=2.0)
    assert list(axial_of_sag.rows) == []
    assert axial_of_sag.dropped == {"anisotropy": 1}

    assert [r.series_id for r in select_series(rows, split="val").rows] == ["valct"]


def test_plane_geometry_per_axis() -> None:
    vol = shape_row("v", (30, 40, 50))
    assert plane_geometry(vol, "axial") == (30, 40, 50)
    assert plane_geometry(vol, "coronal") == (40, 30, 50)
    assert plane_geometry(vol, "sagittal") == (50, 30, 40)
    image = shape_row("i", (1, 40, 50), modality="DX", kind="image")
    assert plane_geometry(image, "sagittal") == (1, 40, 50)


@pytest.mark.parametrize(
    ("alpha", "expected"), [(0.0, [1 / 3] * 3), (1.0, [1 / 105, 4 / 105, 100 / 105]), (0.5, [1 / 13, 2 / 13, 10 / 13])]
)
def test_series_weights_follow_n_to_the_alpha(alpha: float, expected: list[float]) -> None:
    np.testing.assert_allclose(series_weights(np.array([1, 4, 100]), alpha), expected)


def test_slice_probabilities_split_series_weight_equally() -> None:
    rows = [shape_row("a", (1, 32, 32), modality="DX", kind="image"), shape_row("b", (16, 32, 32))]
    index = SliceIndex(rows, alpha=0.5)
    p = index.slice_probabilities()
    assert len(p) == 17 and p.sum() == pytest.approx(1.0)
    # series weights 1 : 4, the 16 slices of "b" share its 4/5 equally
    assert p[0] == pytest.approx(1 / 5)
    np.testing.assert_allclose(p[1:], 4 / 5 / 16)


def test_locate_round_trips_positions() -> None:
    rows = [shape_row("a", (3, 32, 32)), shape_row("b", (5, 32, 32))]
    index = SliceIndex(rows)
    assert [index.locate(p) for p in range(8)] == [(0, 0), (0, 1), (0, 2)] + [(1, s) for s in range(5)]
    with pytest.raises(IndexError):
        index.locate(8)


def test_sampler_draws_follow_policy_so_one_big_series_does_not_drown_xrays() -> None:
    rows = [shape_row(f"xr{i:03d}", (1, 32, 32), modality="DX", kind="image") for i in range(100)]
    rows.append(shape_row("bigct", (600, 32, 32)))
    n_draws = 200_000
    for alpha in (0.5, 1.0):
        index = SliceIndex(rows, alpha=alpha)
        positions = EpochWeightedSampler(index, n_draws, seed=3).epoch_positions(0)
        from_ct = positions >= 100
        expected = 600**alpha / (600**alpha + 100)
        assert from_ct.mean() == pytest.approx(expected, abs=0.005)
        # within the CT, slices are uniform: each decile of the slice range gets a tenth
        deciles = np.bincount((positions[from_ct] - 100) // 60, minlength=10) / from_ct.sum()
        np.testing.assert_allclose(deciles, 0.1, atol=0.01)
        # and the X-rays share the rest equally
        xr_counts = np.bincount(positions[~from_ct], minlength=100)
        assert xr_counts.std() / xr_counts.mean() < 0.1


def test_slice_spacing_drops_series_too_coarse_along_the_axis_and_images() -> None:
    rows = [
        shape_row("thin", (64, 32, 32), spacing=(0.625, 0.7, 0.7)),
        shape_row("match", (16, 32, 32), spacing=(2.5, 0.7, 0.7)),
        shape_row("rounded", (16, 32, 32), spacing=(2.52, 0.7, 0.7)),
        shape_row("thick", (8, 32, 32), spacing=(5.0, 0.7, 0.7)),
        shape_row("xr", (1, 32, 32), modality="DX", kind="image"),
    ]
    kept = select_series(rows, split="train", slice_spacing_mm=2.5, max_anisotropy=10.0)
    assert [r.series_id for r in kept.rows] == ["thin", "match", "rounded"]
    assert kept.dropped == {"slice_spacing": 2}
    # off (index adjacency): nothing is dropped for its spacing
    assert len(select_series(rows, split="train", max_anisotropy=10.0).rows) == 5
    # the spacing checked is the one along the slicing axis (coronal planes step along Y)
    coronal = select_series(rows, split="train", axis="coronal", slice_spacing_mm=0.65, max_anisotropy=10.0)
    assert [r.series_id for r in coronal.rows] == []
    coronal = select_series(rows, split="train", axis="coronal", slice_spacing_mm=0.7, max_anisotropy=10.0)
    assert [r.series_id for r in coronal.rows] == ["thin", "match", "rounded", "thick"]


def test_composition_counts_series_slices_and_patients_without_ids() -> None:
    rows = [
        shape_row("ct1", (10, 32, 32), patient_id="pa"),
        shape_row("ct2", (20, 32, 32), patient_id="pb"),
        shape_row("mr1", (5, 32, 32), modality="MR", source="nifti", patient_id="pa"),
        shape_row("xr1", (1, 32, 32), modality="DX", kind="image", patient_id="pc"),
    ]
    c = SliceIndex(rows).composition()
    assert (c["series"], c["slices"], c["patients"]) == (4, 36, 3)
    assert c["by_modality"] == {
        "CT": {"series": 2, "slices": 30, "patients": 2},
        "DX": {"series": 1, "slices": 1, "patients": 1},
        "MR": {"series": 1, "slices": 5, "patients": 1},
    }
    assert c["by_source"] == {
        "dicom": {"series": 3, "slices": 31, "patients": 3},
        "nifti": {"series": 1, "slices": 5, "patients": 1},
    }
    assert c["by_kind"]["image"] == {"series": 1, "slices": 1, "patients": 1}
    assert c["by_kind"]["volume"] == {"series": 3, "slices": 35, "patients": 2}
    text = repr(c)
    assert not any(sid in text for sid in ("ct1", "ct2", "mr1", "xr1", "'pa'", "'pb'", "'pc'"))
