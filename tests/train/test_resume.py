"""Exact resume: `medmae fit` subprocesses SIGKILLed at three points and resumed with `--ckpt_path last`.

Each kill leaves the run as a dead node would; the resumed run must take every later optimizer step
with the very batches, augmentations, masks and losses of an uninterrupted run (bit for bit with
`num_workers=0`).
Epochs have 4 steps; checkpoints every 3 steps and at every epoch end; validation at every epoch end.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[2]
MAX_STEPS = 12


def _config(path: Path, cache: Path, workers: int, callbacks: list[dict]) -> Path:
    config = {
        "seed_everything": 0,
        "model": {
            "variant": "mae_vit_tiny_patch16",
            "mae": {"img_size": [32, 32], "patch_size": 8, "depth": 2, "decoder_embed_dim": 64, "decoder_depth": 1,
                    "decoder_num_heads": 4},
            "optim": {"lr": 1.0e-3, "warmup_steps": 2},
            "log_images_every_n_steps": 0,
        },  # fmt: skip
        "data": {
            "cache_dir": str(cache),
            "img_size": [32, 32],
            "batch_size": 4,
            "num_workers": workers,
            "sampling": {"samples_per_epoch": 16, "val_samples": 8},
            "loader": {"persistent_workers": workers > 0},
            # on, so the exact-resume checks cover its draws too (seeded by the batch's stream position)
            "augment": {"rotate_deg": 15, "scale": [0.87, 1.15], "gamma": [0.71, 1.4], "bias_field": 0.05},
        },
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "precision": "32-true",
            "max_steps": MAX_STEPS,
            "num_sanity_val_steps": 0,
            "log_every_n_steps": 1,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "logger": {
                "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                "init_args": {"save_dir": "runs", "name": "resume"},
            },
            "callbacks": [
                {
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {"every_n_train_steps": 3, "save_top_k": -1, "save_last": True},
                },
                {
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {
                        "every_n_epochs": 1,
                        "save_on_train_epoch_end": True,
                        "save_top_k": -1,
                        "save_last": True,
                    },
                },
                *callbacks,
            ],
        },
    }
    path.write_text(yaml.safe_dump(config))
    return path


def _fit(workdir: Path, cache: Path, workers: int, log: str, kill: dict | None = None, resume: bool = False):
    callbacks = [{"class_path": "tests.train.resume_helpers.StepLog", "init_args": {"path": log}}]
    if kill is not None:
        callbacks.append({"class_path": "tests.train.resume_helpers.KillAt", "init_args": kill})
    config = _config(workdir / f"{Path(log).stem}.yaml", cache, workers, callbacks)
    cmd = [sys.executable, "-m", "medmae.cli", "fit", "--config", str(config)]
    if resume:
        cmd += ["--ckpt_path", "last"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=600)
    return proc


def _steps(path: Path) -> dict[int, dict]:
    records = [json.loads(line) for line in path.read_text().splitlines()]
    return {r["step"]: r for r in records}


@pytest.fixture(scope="module")
def reference(tiny_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[int, dict[int, dict]]:
    """Uninterrupted runs, per worker count, computed on first use."""
    runs: dict[int, dict[int, dict]] = {}

    def get(workers: int) -> dict[int, dict]:
        if workers not in runs:
            work = tmp_path_factory.mktemp(f"uninterrupted_{workers}")
            proc = _fit(work, tiny_cache, workers, str(work / "steps.jsonl"))
            assert proc.returncode == 0, proc.stderr[-3000:]
            runs[workers] = _steps(work / "steps.jsonl")
            assert sorted(runs[workers]) == list(range(1, MAX_STEPS + 1))
        return runs[workers]

    return get  # type: ignore[return-value]


KILLS = {
    # mid-epoch: the newest checkpoint is the step-6 one, 2 of epoch 1's 4 steps done
    "mid_epoch": ({"hook": "train_batch_end", "step": 7}, 6),
    # just after the epoch-0 end checkpoint (step 4), before epoch 1 trains
    "after_epoch_end_checkpoint": ({"hook": "train_epoch_start", "epoch": 1}, 4),
    # during epoch 1's validation (after step 8); the newest checkpoint is step 6's
    "during_validation": ({"hook": "validation_batch_end", "step": 8}, 6),
}


def _kill_and_resume(tmp_path: Path, cache: Path, workers: int, kill: dict, ckpt_step: int, reference):
    killed = _fit(tmp_path, cache, workers, str(tmp_path / "killed.jsonl"), kill=kill)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    resumed = _fit(tmp_path, cache, workers, str(tmp_path / "resumed.jsonl"), resume=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    # --ckpt_path last found the killed run's checkpoint and continued its logger version
    versions = sorted(p.name for p in (tmp_path / "runs" / "resume").iterdir())
    assert versions == ["version_0"]
    last = torch.load(tmp_path / "runs/resume/version_0/checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == MAX_STEPS

    ref = reference(workers)
    before, after = _steps(tmp_path / "killed.jsonl"), _steps(tmp_path / "resumed.jsonl")
    assert sorted(after) == list(range(ckpt_step + 1, MAX_STEPS + 1))
    for step, record in [*before.items(), *after.items()]:
        expected = ref[step]
        assert (record["epoch"], record["draws"]) == (expected["epoch"], expected["draws"]), step
        loss, ref_loss = float.fromhex(record["loss"]), float.fromhex(expected["loss"])
        if workers == 0:
            assert record["loss"] == expected["loss"], (step, loss, ref_loss)
        else:
            assert loss == pytest.approx(ref_loss, rel=1e-6, abs=0), step


@pytest.mark.parametrize("where", ["mid_epoch"])
def test_resume_after_sigkill_is_exact(where: str, tiny_cache: Path, tmp_path: Path, reference) -> None:
    kill, ckpt_step = KILLS[where]
    _kill_and_resume(tmp_path, tiny_cache, 0, kill, ckpt_step, reference)


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("where", sorted(KILLS))
def test_resume_after_sigkill_is_exact_everywhere(
    where: str, workers: int, tiny_cache: Path, tmp_path: Path, reference
) -> None:
    kill, ckpt_step = KILLS[where]
    _kill_and_resume(tmp_path, tiny_cache, workers, kill, ckpt_step, reference)
