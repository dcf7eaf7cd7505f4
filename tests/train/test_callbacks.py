"""The reconstruction grid shows the right channel and says what each panel is."""

import torch

from medmae.train import MAEPretrainModule, reconstruction_grid
from medmae.train.callbacks import PANEL_TITLES, TITLE_HEIGHT, ChannelView, channel_view, grid_legend
from tests.train.conftest import with_mae

SIZE = 64


def _original_panel(grid: torch.Tensor) -> torch.Tensor:
    top = TITLE_HEIGHT + 2
    return grid[0, top : top + SIZE, 2 : 2 + SIZE]


def _marked(channels: int, marked: int) -> torch.Tensor:
    imgs = torch.zeros(2, channels, SIZE, SIZE)
    imgs[:, marked, :32] = 1.0  # only the marked channel has structure: top half bright
    return imgs


def test_odd_slice_count_shows_the_centre_slice(tiny_model_kwargs: dict) -> None:
    module = MAEPretrainModule(**with_mae(tiny_model_kwargs, in_chans=3)).eval()
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
    module = MAEPretrainModule(**with_mae(tiny_model_kwargs, in_chans=2)).eval()
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
    module = MAEPretrainModule(**with_mae(tiny_model_kwargs, in_chans=1)).eval()
    grid = reconstruction_grid(module.model, _marked(1, 0), torch.Generator().manual_seed(0))
    strip = grid[0, :TITLE_HEIGHT]
    for i in range(len(PANEL_TITLES)):  # every panel has ink above it
        x = 2 + i * (SIZE + 2)
        assert (strip[:, x : x + SIZE] < 0.5).any()
    assert PANEL_TITLES[-1] == "output+GT"
    legend = grid_legend(ChannelView(0, "channel 0 of 1"))
    assert "ground-truth" in legend and "not the model's own output" in legend


class _SlowImages(torch.utils.data.Dataset):
    """Each sample takes 100 ms to load: the loader, not the model, sets the pace."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        import time

        time.sleep(0.1)
        return {"image": self.images[i]}


def test_throughput_logger_warns_when_the_loader_starves_the_step(tmp_path, tiny_model_kwargs: dict) -> None:
    import lightning.pytorch as pl
    import pytest

    from medmae.train.callbacks import ThroughputLogger
    from tests.train.conftest import TensorDataModule, smooth_images

    class SlowData(TensorDataModule):
        def train_dataloader(self):
            return torch.utils.data.DataLoader(_SlowImages(self.images), batch_size=self.batch_size, shuffle=False)

    module = MAEPretrainModule(**tiny_model_kwargs, optim={"warmup_steps": 0})  # attaches its own ThroughputLogger
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=26,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=tmp_path,
    )
    with pytest.warns(UserWarning, match="waits on the data loader .* data.num_workers"):
        trainer.fit(module, datamodule=SlowData(smooth_images(8), batch_size=2))
    logger = next(cb for cb in trainer.callbacks if isinstance(cb, ThroughputLogger))
    assert logger.warned
    assert logger.totals["waited"] / logger.totals["seconds"] > logger.warn_wait_fraction
    summary = logger.summary()
    assert summary is not None and "images/s" in summary and "GFLOP/image" in summary
    rate = logger.totals["images"] / logger.totals["seconds"]
    assert logger.mfu(rate, 1) is None  # on CPU: no device peak, no MFU
    logger.peak_tflops = 1.0
    assert logger.mfu(rate, 2) == pytest.approx(model_flops(module) * rate / 2e12)


def model_flops(module: MAEPretrainModule) -> float:
    from medmae.models.flops import model_train_flops

    return model_train_flops(module.model)


def test_flops_formula_matches_the_published_vit_b_figure() -> None:
    from medmae.models import create_mae
    from medmae.models.flops import mae_train_flops, model_train_flops
    from medmae.train.callbacks import peak_tflops

    vit_b = mae_train_flops(196, 16 * 16 * 3, 768, 12, 512, 8)
    assert 58e9 < vit_b < 59.5e9  # 3 x the ~19.6 GFLOP forward of MAE ViT-B/16 at 75% masking
    model = create_mae("mae_vit_base_patch16", in_chans=3)
    assert model_train_flops(model) == vit_b
    assert peak_tflops("NVIDIA H200") == 989.0 and peak_tflops("a CPU") is None
