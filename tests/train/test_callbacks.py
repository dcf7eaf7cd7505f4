"""The reconstruction grid shows the right channel and says what each panel is."""

import torch

from medmae.train import MAEPretrainModule, reconstruction_grid
from medmae.train.callbacks import PANEL_TITLES, TITLE_HEIGHT, ChannelView, channel_view, grid_legend

SIZE = 64


def _original_panel(grid: torch.Tensor) -> torch.Tensor:
    top = TITLE_HEIGHT + 2
    return grid[0, top : top + SIZE, 2 : 2 + SIZE]


def _marked(channels: int, marked: int) -> torch.Tensor:
    imgs = torch.zeros(2, channels, SIZE, SIZE)
    imgs[:, marked, :32] = 1.0  # only the marked channel has structure: top half bright
    return imgs


def test_odd_slice_count_shows_the_centre_slice(tiny_model_kwargs: dict) -> None:
    module = MAEPretrainModule(**{**tiny_model_kwargs, "in_chans": 3}).eval()
    grid = reconstruction_grid(module.model, _marked(3, 1), torch.Generator().manual_seed(0))
    assert grid.shape == (3, TITLE_HEIGHT + 2 * SIZE + 3 * 2, 4 * SIZE + 5 * 2)
    original = _original_panel(grid)
    assert torch.all(original[:32] == 1.0) and torch.all(original[32:] == 0.0)


def test_even_slice_count_shows_the_offset_zero_slice() -> None:
    # slices sit at offsets -(k-1)//2 .. k//2: for k = 2 that is [0, +1], so channel 0 is the centre
    record = {"slices": 2, "intensity": {"ct": {"mode": "random", "windows_level_width": [[40, 400]]}}}
    view = channel_view(record, in_chans=2)
    assert view.channel == 0
    assert channel_view(None, in_chans=4).channel == 1  # offsets [-1, 0, 1, 2]


def test_even_slice_grid_draws_channel_zero(tiny_model_kwargs: dict) -> None:
    module = MAEPretrainModule(**{**tiny_model_kwargs, "in_chans": 2}).eval()
    view = channel_view({"slices": 2}, in_chans=2)
    grid = reconstruction_grid(module.model, _marked(2, 0), torch.Generator().manual_seed(0), view)
    assert torch.all(_original_panel(grid)[:32] == 1.0)


def test_window_as_channel_mode_names_the_window_shown() -> None:
    windows = [[40, 400], [-600, 1500], [400, 1800]]
    record = {"slices": 3, "intensity": {"ct": {"mode": "channels", "windows_level_width": windows}}}
    view = channel_view(record, in_chans=9)
    assert view.channel == 1  # window-major: window 0's centre slice
    assert "CT window 1 of 3" in view.note and "level 40 / width 400" in view.note
    assert "window" not in channel_view({"slices": 3}, in_chans=3).note


def test_title_strip_labels_the_ground_truth_panel(tiny_model_kwargs: dict) -> None:
    module = MAEPretrainModule(**{**tiny_model_kwargs, "in_chans": 1}).eval()
    grid = reconstruction_grid(module.model, _marked(1, 0), torch.Generator().manual_seed(0))
    strip = grid[0, :TITLE_HEIGHT]
    for i in range(len(PANEL_TITLES)):  # every panel has ink above it
        x = 2 + i * (SIZE + 2)
        assert (strip[:, x : x + SIZE] < 0.5).any()
    assert PANEL_TITLES[-1] == "output+GT"
    legend = grid_legend(ChannelView(0, "channel 0 of 1"))
    assert "ground-truth" in legend and "not the model's own output" in legend
