"""Checkpoints written before issue 19 (flat ``model`` hyper-parameters) still export, pre-check and resume.

The files under tests/fixtures/ were made by tests/fixtures/make_old_mae_checkpoint.py with the last
flat-argument revision (see tests/fixtures/README.md); ``old_mae_reference.json`` holds what that code
made of them. The current code must give the same export card, the same encoder tensors and, after
resuming the 2D run for 2 steps through ``medmae fit``, the same weights.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from medmae.export.encoder import export_checkpoint
from medmae.models import MaskedAutoencoder, MaskedAutoencoder3D
from medmae.train.cli import _check_mae_checkpoint
from medmae.train.module import MAEPretrainModule

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures"
REFERENCE = json.loads((FIXTURES / "old_mae_reference.json").read_text())


def _sums(state: dict[str, torch.Tensor]) -> dict[str, list[float]]:
    return {k: [float(v.double().sum()), float(v.double().abs().sum())] for k, v in sorted(state.items())}


def _assert_same_sums(got: dict[str, list[float]], want: dict[str, list[float]]) -> None:
    assert sorted(got) == sorted(want)
    for name, (total, size) in want.items():
        assert got[name][0] == pytest.approx(total, rel=1e-5, abs=1e-6 * max(1.0, size)), name
        assert got[name][1] == pytest.approx(size, rel=1e-5, abs=1e-6), name


def _load(name: str) -> dict:
    return torch.load(FIXTURES / name, map_location="cpu", weights_only=True)


@pytest.mark.parametrize(("name", "dims"), [("2d", 2), ("3d", 3)])
def test_old_checkpoint_exports_the_same_card_and_encoder(name: str, dims: int, tmp_path: Path) -> None:
    ckpt = _load(f"old_mae_{name}.ckpt")
    assert "blr" in ckpt["hyper_parameters"] and "mae" not in ckpt["hyper_parameters"]  # really the old form
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # the exporter maps old keys without complaint
        weights = export_checkpoint(FIXTURES / f"old_mae_{name}.ckpt", tmp_path / "export")
    card = json.loads((tmp_path / "export" / "encoder.json").read_text())
    card.pop("versions"), card.pop("producer")
    assert card == REFERENCE[name]["card"]
    assert card["encoder"].get("spatial_dims", 2) == dims
    _assert_same_sums(_sums(load_file(str(weights))), REFERENCE[name]["encoder_sums"])


@pytest.mark.parametrize("name", ["2d", "3d"])
def test_old_hyper_parameters_rebuild_the_new_module(name: str) -> None:
    ckpt = _load(f"old_mae_{name}.ckpt")
    _check_mae_checkpoint(ckpt, f"old_mae_{name}.ckpt")  # the CLI's --ckpt_path pre-check (meta device)
    module = MAEPretrainModule.from_hparams(ckpt["hyper_parameters"])
    module.load_state_dict(ckpt["state_dict"], strict=True)
    assert isinstance(module.model, MaskedAutoencoder3D if name == "3d" else MaskedAutoencoder)
    old = ckpt["hyper_parameters"]
    assert module.mae_options.depth == old["depth"] and module.optim_options.blr == old["blr"]
    assert module.hparams["mae"]["decoder_embed_dim"] == old["decoder_embed_dim"]
    assert "blr" not in module.hparams and module.hparams["optim"]["warmup_steps"] == old["warmup_steps"]
    loaded = MAEPretrainModule.load_from_checkpoint(FIXTURES / f"old_mae_{name}.ckpt", map_location="cpu")
    assert dict(loaded.hparams) == dict(module.hparams)  # also through LightningCLI's instantiator (2D file)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in ckpt["state_dict"].items())


def test_old_checkpoint_resumes_through_medmae_fit_with_the_same_weights(tmp_path: Path) -> None:
    """The reference run: the old flat config (its model and data keys load with deprecation warnings),
    ``--ckpt_path`` the old checkpoint, 2 more steps; the weights equal those the old code reached."""
    from tests.fixtures.make_old_mae_checkpoint import build_cache

    build_cache(tmp_path / "cache")
    (tmp_path / "old.yaml").write_text(REFERENCE["config_2d"])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    args = [*REFERENCE["resume_args"], "--ckpt_path", str(FIXTURES / "old_mae_2d.ckpt")]
    proc = subprocess.run(
        [sys.executable, "-m", "medmae.cli", "fit", *args],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "model.blr is deprecated: use model.optim.blr" in proc.stderr
    assert "model.mask_ratio is deprecated: use model.mae.mask_ratio" in proc.stderr  # from the checkpoint
    resumed = max((tmp_path / "runs").rglob("last*.ckpt"), key=lambda p: p.stat().st_mtime_ns)
    ckpt = torch.load(resumed, map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == REFERENCE["2d"]["resumed_global_step"] == 4
    hp = ckpt["hyper_parameters"]
    assert hp["mae"]["depth"] == 2 and hp["optim"]["blr"] == 1.0e-2 and "blr" not in hp  # written in the new form
    _assert_same_sums(_sums(ckpt["state_dict"]), REFERENCE["2d"]["resumed_sums"])
