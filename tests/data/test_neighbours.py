"""Which planes form a 2.5D sample's channels: index adjacency, or millimetre offsets (nearest / linear)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from medmae.data.neighbours import SliceNeighbours, fits_slice_spacing


def test_index_adjacency_is_clamped_at_the_edges() -> None:
    three = SliceNeighbours.centred(3)
    assert three.pick(0, 10).indices.tolist() == [0, 0, 1]
    assert three.pick(9, 10).indices.tolist() == [8, 9, 9]
    assert SliceNeighbours.centred(4).pick(5, 10).indices.tolist() == [4, 5, 6, 7]
    assert three.pick(0, 1).indices.tolist() == [0, 0, 0]
    assert three.pick(5, 10, axis_spacing=0.625).indices.tolist() == [4, 5, 6]  # spacing is ignored


@pytest.mark.parametrize(
    ("axis_spacing", "expected"),
    [(0.625, [28, 32, 36]), (1.25, [30, 32, 34]), (2.5, [31, 32, 33]), (2.49, [31, 32, 33])],
)
def test_nearest_places_channels_at_the_same_millimetres_whatever_the_spacing(
    axis_spacing: float, expected: list[int]
) -> None:
    rule = SliceNeighbours.centred(3, spacing_mm=2.5)
    assert rule.pick(32, 200, axis_spacing).indices.tolist() == expected


def test_nearest_ties_go_away_from_the_centre_symmetrically() -> None:
    rule = SliceNeighbours.centred(3, spacing_mm=2.5)
    assert rule.pick(10, 40, axis_spacing=1.0).indices.tolist() == [7, 10, 13]  # +-2.5 planes -> +-3


def test_linear_blends_the_two_bracketing_planes_and_keeps_the_centre_exact() -> None:
    rule = SliceNeighbours.centred(3, spacing_mm=2.5, interpolation="linear")
    pick = rule.pick(10, 40, axis_spacing=1.0)
    planes = np.arange(40, dtype=np.int16)[:, None, None] * 8  # plane z holds 8 z
    channels = pick.channels(planes[pick.indices])
    assert channels.dtype == np.float32
    np.testing.assert_array_equal(channels[:, 0, 0], [8 * 7.5, 80.0, 8 * 12.5])
    # on the grid (0.625 mm planes, 2.5 mm offsets) linear reads the very planes nearest reads
    on_grid = rule.pick(32, 65, axis_spacing=0.625)
    np.testing.assert_array_equal(on_grid.weights, 0.0)
    assert sorted(set(on_grid.indices.tolist())) == [28, 32, 36]


def test_linear_clamps_positions_beyond_the_series() -> None:
    rule = SliceNeighbours.centred(3, spacing_mm=2.5, interpolation="linear")
    pick = rule.pick(0, 5, axis_spacing=1.0)
    planes = np.arange(5, dtype=np.float32)[:, None, None]
    np.testing.assert_allclose(pick.channels(planes[pick.indices])[:, 0, 0], [0.0, 0.0, 2.5])
    pick = rule.pick(4, 5, axis_spacing=1.0)
    np.testing.assert_allclose(pick.channels(planes[pick.indices])[:, 0, 0], [1.5, 4.0, 4.0])


def test_millimetre_rule_needs_the_series_spacing() -> None:
    with pytest.raises(ValueError, match="slice_spacing_mm=2.5 .* needs the series' spacing"):
        SliceNeighbours.centred(3, spacing_mm=2.5).pick(3, 10, axis_spacing=None)


def test_one_slice_has_no_neighbours_to_place() -> None:
    rule = SliceNeighbours.centred(1, spacing_mm=2.5)
    assert not rule.by_distance and rule.spacing_mm is None
    assert rule.pick(3, 10).indices.tolist() == [3]


def test_series_coarser_than_the_offset_do_not_fit() -> None:
    assert fits_slice_spacing(2.5, 2.5) and fits_slice_spacing(0.625, 2.5)
    assert fits_slice_spacing(2.52, 2.5)  # header rounding (1 % tolerance)
    assert not fits_slice_spacing(2.6, 2.5) and not fits_slice_spacing(5.0, 2.5)
    assert not fits_slice_spacing(None, 2.5)  # a single image has no through-plane neighbours
    assert fits_slice_spacing(5.0, None) and fits_slice_spacing(None, None)  # index adjacency: no filter


@pytest.mark.parametrize("value", [0, -1.0, math.nan, math.inf, True, "2.5"])
def test_bad_slice_spacing_is_named(value: object) -> None:
    with pytest.raises(ValueError, match="slice_spacing_mm"):
        SliceNeighbours.centred(3, spacing_mm=value)  # type: ignore[arg-type]


def test_bad_slice_interpolation_is_named() -> None:
    with pytest.raises(ValueError, match="slice_interpolation must be one of"):
        SliceNeighbours.centred(3, spacing_mm=2.5, interpolation="cubic")


def test_card_fields_describe_the_rule() -> None:
    d = SliceNeighbours.centred(3, spacing_mm=2.5, interpolation="linear").describe()
    assert d["slice_offsets"] == [-1, 0, 1] and d["slice_spacing_mm"] == 2.5
    assert d["slice_offsets_mm"] == [-2.5, 0.0, 2.5] and d["slice_interpolation"] == "linear"
    index = SliceNeighbours.centred(3).describe()
    assert index["slice_spacing_mm"] is None and index["slice_offsets_mm"] is None


def test_bad_slice_spacing_is_refused_even_with_one_slice() -> None:
    with pytest.raises(ValueError, match="slice_spacing_mm"):
        SliceNeighbours.centred(1, spacing_mm=-1.0)
