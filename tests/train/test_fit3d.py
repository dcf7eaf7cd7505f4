"""`medmae fit` with the 3D choice (``mae3d_*`` + ``data.volume``): trains, exports, loads into MONAI UNETR 3D."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from medmae.data import CacheDataModule
from medmae.data.volume import VolumeOptions
from medmae.export.encoder import export_checkpoint
from medmae.export.unetr3d import build_unetr3d_from_export
from medmae.models import MAEOptions
from medmae.train.cli import fit_main
from medmae.train.module import MAEPretrainModule
from tests.data.conftest import CacheBuilder

REPO = Path(__file__).resolve().parents[2]
TINY_3D = REPO / "configs" / "pretrain" / "tiny_3d_cpu.yaml"


def phantom(seed: int, shape: tuple[int, int, int] = (40, 64, 64)) -> np.ndarray:
    """A CT-like body: a water cylinder with a bone rod, in air (HU)."""
    rng = np.random.default_rng(seed)
    _, yy, xx = np.mgrid[: shape[0], : shape[1], : shape[2]]
    vol = np.full(shape, -1000, np.int16)
    body = (yy - 32) ** 2 + (xx - 32) ** 2 < (18 + seed) ** 2
    vol[body] = rng.normal(40, 20, int(body.sum())).astype(np.int16)
    vol[body & ((yy - 28 - seed) ** 2 + (xx - 36) ** 2 < 30)] = 700
    return vol


@pytest.fixture
def volume_cache(tmp_path: Path) -> Path:
    builder = CacheBuilder(tmp_path / "cache3d")
    for i in range(3):
        builder.add(f"s{i}", phantom(i), spacing=(3.0, 2.0, 2.0))
    builder.add("v0", phantom(3), spacing=(3.0, 2.0, 2.0), split="val")
    builder.add("xr", np.zeros((1, 64, 64), np.int16), kind="image")
    return builder.write()


def _args(cache: Path, tmp_path: Path, *extra: str) -> list[str]:
    return [
        "--config", str(TINY_3D),
        "--data.cache_dir", str(cache),
        "--data.num_workers", "0",
        "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
        "--trainer.enable_progress_bar", "false",
        *extra,
    ]  # fmt: skip


def _loss(module: MAEPretrainModule, batch: torch.Tensor) -> float:
    module.eval()
    with torch.no_grad():
        return float(module.model(batch, generator=torch.Generator().manual_seed(0)).loss)


def test_tiny_3d_fit_lowers_the_loss_and_exports_into_unetr3d(volume_cache: Path, tmp_path: Path) -> None:
    small = ["--model.mae.embed_dim", "48", "--model.mae.num_heads", "2", "--model.mae.decoder_embed_dim", "48"]
    small += ["--model.optim.lr", "2e-3"]  # batch 2: blr x 2 / 256 would barely move in 30 steps
    fit_main(_args(volume_cache, tmp_path, "--trainer.max_steps", "30", "--data.batch_size", "2", *small))
    ckpt_path = next((tmp_path / "runs").rglob("last.ckpt"))
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 30
    record = ckpt["medmae"]["preprocessing"]
    assert record["spatial_dims"] == 3 and record["volume"]["size"] == [64, 64, 64]
    assert record["training_data"]["series"] == 3  # the X-ray is not a volume
    hparams = {k: v for k, v in ckpt["hyper_parameters"].items() if not k.startswith("_")}

    trained = MAEPretrainModule(**hparams)
    trained.load_state_dict(ckpt["state_dict"])
    torch.manual_seed(0)
    fresh = MAEPretrainModule(**hparams)
    dm = CacheDataModule(str(volume_cache), batch_size=4, num_workers=0, volume=VolumeOptions(size=64, spacing_mm=3.0))
    dm.setup("fit")
    batch = torch.stack([dm.train_dataset[i]["image"] for i in range(3)])  # centre-free fixed samples (int keys)
    assert _loss(trained, batch) < 0.9 * _loss(fresh, batch)

    # the export (the same `medmae export` code) loads into MONAI UNETR(spatial_dims=3)
    out = tmp_path / "encoder"
    export_checkpoint(ckpt_path, out)
    card = json.loads((out / "encoder.json").read_text())
    assert card["encoder"]["arch"] == "medmae_vit3d" and card["preprocessing"]["spatial_dims"] == 3
    unetr = build_unetr3d_from_export(out, out_channels=2)
    unetr.eval()
    encoder = trained.model.encoder.eval()
    with torch.no_grad():
        _, hidden = unetr.vit(batch[:1])
        _, expected = encoder.forward_intermediates(batch[:1])
        assert len(hidden) == len(expected) == 12
        for theirs, ours in zip(hidden, expected, strict=True):
            assert torch.allclose(theirs, ours, atol=1e-4)
        assert unetr(batch[:1]).shape == (1, 2, 64, 64, 64)


def test_reconstruction_grid_shows_three_planes(volume_cache: Path, tmp_path: Path) -> None:
    from medmae.train.callbacks import reconstruction_grid

    fit = MAEPretrainModule(
        variant="mae3d_vit_tiny_patch16",
        mae=MAEOptions(img_size=(64, 64, 64), embed_dim=48, depth=1, num_heads=2, decoder_embed_dim=48,
                       decoder_depth=1, decoder_num_heads=2),
    )  # fmt: skip
    dm = CacheDataModule(str(volume_cache), batch_size=2, num_workers=0, volume=VolumeOptions(size=64, spacing_mm=3.0))
    dm.setup("fit")
    batch = torch.stack([dm.train_dataset[i]["image"] for i in range(2)])
    grid = reconstruction_grid(fit.model, batch, torch.Generator().manual_seed(0))
    # title strip + 2 samples x 3 planes of 64 px (+ 2 px padding), 4 panels across
    assert grid.shape == (3, 12 + 6 * 66 + 2, 4 * 66 + 2)
    assert grid.min() >= 0 and grid.max() <= 1


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--model.mae.img_size", "[60, 64, 64]", "--data.volume.size", "[60, 64, 64]"], "not divisible by patch_size"),
        (["--data.volume.spacing_mm", "0"], "data.volume.spacing_mm"),
        (["--data.volume.spacing_mm", "[3.0, -1.0, 3.0]"], "data.volume.spacing_mm"),
        (["--model.mae.in_chans", "2"], "model.mae.in_chans=2"),
        (["--data.volume.size", "[48, 48, 48]"], "data.volume.size"),
        (["--data.volume", "null"], "3D MAE but the data yields 2D samples"),
        (["--model.variant", "mae3d_vit_large_patch16"], "unknown model.variant 'mae3d_vit_large_patch16'"),
    ],
)
def test_bad_3d_config_stops_before_training_naming_the_field(
    volume_cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    with pytest.raises(SystemExit) as exc:
        fit_main(_args(volume_cache, tmp_path, "--trainer.max_steps", "1", *extra))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not list((tmp_path / "runs").rglob("*.ckpt"))


def test_no_identifying_value_of_the_samples_reaches_3d_outputs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """PHI canary for the 3D path: real sample DICOM/NIfTI (names, dates, UIDs, institutions in their
    headers) -> prep -> 3D fit with reconstruction images -> export; nothing identifying comes out."""
    from data_prep import prep_archive
    from medmae.demo import sample_archives
    from tests.test_demo import _identifying_strings

    cache = tmp_path / "cache"
    prep_archive(sample_archives(), cache, workers=1, salt_file=tmp_path / "salt", val_fraction=0.0, progress=False)
    fit_main(
        _args(cache, tmp_path, "--trainer.max_steps", "2", "--model.log_images_every_n_steps", "1")
        + ["--model.mae.embed_dim", "48", "--model.mae.num_heads", "2", "--model.mae.decoder_embed_dim", "48"]
    )
    ckpt = next((tmp_path / "runs").rglob("last.ckpt"))
    export_checkpoint(ckpt, tmp_path / "encoder")
    assert list((tmp_path / "runs").rglob("events.out.tfevents.*"))
    captured = capsys.readouterr()
    canaries = _identifying_strings()
    assert len(canaries) > 20
    needles = [(c, c.encode("utf-8")) for c in canaries] + [(c, c.encode("utf-16-le")) for c in canaries]
    leaks = []
    for root in (tmp_path / "runs", tmp_path / "encoder"):
        for path in root.rglob("*"):
            if path.is_file():
                data = path.read_bytes()
                leaks += [f"{path.relative_to(tmp_path)}: {c!r}" for c, needle in needles if needle in data]
    leaks += [f"output: {c!r}" for c in canaries if c in captured.out or c in captured.err]
    assert leaks == []
