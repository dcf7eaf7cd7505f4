"""Configuration mistakes stop `medmae fit` before training with one line that names the field or file."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from medmae.data.cache import write_manifest
from medmae.train.cli import fit_main

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "pretrain" / "tiny_cpu.yaml"


def _args(cache: Path | str, tmp_path: Path, *extra: str) -> list[str]:
    return [
        "--config", str(TINY),
        "--data.cache_dir", str(cache),
        "--data.num_workers", "0",
        "--trainer.max_steps", "2",
        "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
        "--trainer.enable_progress_bar", "false",
        *extra,
    ]  # fmt: skip


def _empty_cache(tmp_path: Path) -> Path:
    write_manifest(tmp_path / "empty", [], val_fraction=0.1)
    return tmp_path / "empty"


def _no_manifest(tmp_path: Path) -> Path:
    (tmp_path / "not_a_cache").mkdir()
    return tmp_path / "not_a_cache"


CASES = {
    "missing_cache_dir": (lambda t, c: t / "nowhere", [], "data.cache_dir"),
    "folder_without_manifest": (lambda t, c: _no_manifest(t), [], "manifest.json"),
    "empty_cache": (lambda t, c: _empty_cache(t), [], "no usable training slice"),
    "min_size_above_every_image": (
        lambda t, c: c, ["--data.selection.min_size", "4096"], "data.selection.min_size=4096"
    ),
    "samples_per_epoch_below_a_batch": (
        lambda t, c: c, ["--data.sampling.samples_per_epoch", "8"], "data.sampling.samples_per_epoch"
    ),
    "mask_ratio_without_visible_patch": (lambda t, c: c, ["--model.mae.mask_ratio", "0.999"], "mask_ratio"),
    "depth_zero": (lambda t, c: c, ["--model.mae.depth", "0"], "depth"),
    "depth_negative": (lambda t, c: c, ["--model.mae.depth", "-3"], "depth"),
    "max_steps_below_minus_one": (lambda t, c: c, ["--trainer.max_steps", "-5"], "trainer.max_steps"),
    "absurd_embed_dim": (lambda t, c: c, ["--model.mae.embed_dim", "10000000"], "embed_dim"),
    "absurd_decoder_embed_dim": (lambda t, c: c, ["--model.mae.decoder_embed_dim", "1000000"], "decoder_embed_dim"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_naming_the_field(
    case: str, tiny_cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cache_of, extra, field = CASES[case]
    with pytest.raises(SystemExit) as exc:
        fit_main(_args(cache_of(tmp_path, tiny_cache), tmp_path, *extra))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("medmae fit: error:"), err
    assert field in errors[0]
    assert "Traceback" not in err
    assert not list((tmp_path / "runs").rglob("*.ckpt"))


def test_depth_zero_through_the_medmae_command(tiny_cache: Path, tmp_path: Path) -> None:
    """The installed entry point: exit status 2, one error line, no traceback, nothing trained."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-m", "medmae.cli", "fit", *_args(tiny_cache, tmp_path, "--model.mae.depth", "0")],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert errors == ["medmae fit: error: invalid configuration: model.mae.depth must be an int in [1, 256], got 0"]
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").rglob("*.ckpt"))
