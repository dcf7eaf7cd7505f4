"""`medmae fit` through LightningCLI on a cache built from real files."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from medmae.train.cli import fit_main

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "pretrain" / "tiny_cpu.yaml"


def _args(cache: Path, tmp_path: Path, *extra: str) -> list[str]:
    return [
        "--config", str(TINY),
        "--data.cache_dir", str(cache),
        "--data.num_workers", "0",
        "--trainer.max_steps", "3",
        "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
        "--trainer.enable_progress_bar", "false",
        *extra,
    ]


def test_fit_from_the_command_line_runs_and_checkpoints(sample_cache: Path, tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "medmae.cli", "fit", *_args(sample_cache, tmp_path)],
        capture_output=True, text=True, cwd=tmp_path, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpts = list((tmp_path / "runs").rglob("last.ckpt"))
    assert len(ckpts) == 1
    ckpt = torch.load(ckpts[0], map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 3
    assert ckpt["medmae"]["preprocessing"]["slices"] == 1
    assert list((tmp_path / "runs").rglob("config.yaml"))


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--model.mae.img_size", "[60, 60]", "--data.img_size", "[60, 60]"], "img_size"),
        (["--data.slices", "3"], "model.mae.in_chans=1"),
        (["--data.img_size", "[64, 96]"], "data.img_size"),
        (["--model.decoder_width", "64"], "decoder_width"),
    ],
)
def test_bad_config_stops_before_training_naming_the_field(
    sample_cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    with pytest.raises(SystemExit) as exc:
        fit_main(_args(sample_cache, tmp_path, *extra))
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
    assert not list((tmp_path / "runs").rglob("*.ckpt"))


def test_unknown_key_in_a_yaml_file_is_named(sample_cache: Path, tmp_path: Path, capsys) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("model:\n  mask_ratoi: 0.5\n")
    with pytest.raises(SystemExit):
        fit_main(_args(sample_cache, tmp_path, "--config", str(config)))
    assert "mask_ratoi" in capsys.readouterr().err


def test_one_node_ddp_relaunches_the_medmae_command(sample_cache: Path, tmp_path: Path) -> None:
    """Lightning's DDP launcher starts the other ranks by re-running ``sys.argv``: through the installed
    ``medmae`` script that must be ``medmae fit ...`` again (it used to be a file named ``medmae`` in the
    working folder: the second rank exited 2). Two gloo ranks on CPU."""
    import shutil

    script = shutil.which("medmae")
    assert script, "the medmae console script is installed by `pip install -e .`"
    proc = subprocess.run(
        [script, "fit", *_args(sample_cache, tmp_path, "--trainer.max_steps", "2", "--trainer.devices", "2",
                               "--trainer.strategy", "ddp", "--data.batch_size", "4",
                               "--data.sampling.samples_per_epoch", "32")],
        capture_output=True, text=True, cwd=tmp_path, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "MEMBER: 2/2" in proc.stderr and "can't open file" not in proc.stderr
    (ckpt,) = (tmp_path / "runs").rglob("last.ckpt")
    assert torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"] == 2
