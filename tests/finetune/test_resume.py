"""Fine-tuning resumes like pretraining (issue 18, rows 11-12): `finetune-seg` / `finetune-cls`
subprocesses SIGKILLed mid-run and resumed, against an uninterrupted run of the same config.

* row 11: ``--ckpt_path last`` finds the killed run's newest ``last*.ckpt`` and continues its logger
  version (no ``version_1``, no restart at step 0);
* row 12: the resumed run (also from an explicit ``version_0/checkpoints/last.ckpt``) ends at the
  uninterrupted run's global step and Adam step, logs the same TensorBoard steps and values, and
  trains on the very same draws with bit-identical losses (``num_workers`` 0 and 2).

Epochs have 4 optimizer steps (18 draws in batches of 4: the last 2 draws are dropped) and end with
validation. Checkpoints as the shipped configs write them: the best by a validation metric plus
``last`` at every validation end, and every 3 steps (a second ``last``). The kill
(``tests.train.resume_helpers.KillAt``) is a callback of the run itself, so where it dies is exact.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

from medmae.data import CacheDataModule
from medmae.export import export_encoder
from medmae.models import create_mae

REPO = Path(__file__).resolve().parents[2]
NIB_DATA = Path(nib.__file__).parent / "tests" / "data"
MAX_STEPS = 12
#: where the run is killed, and the step of its newest checkpoint (what ``--ckpt_path last`` resumes)
KILLS = {
    # mid-epoch: after global step 7 (epoch 1, 3 of 4 steps); the newest checkpoint is step 6's
    "mid_epoch": ({"hook": "train_batch_end", "step": 7}, 6),
    # as epoch 2 starts: the newest checkpoint is epoch 1's validation-end one (step 8)
    "after_epoch_end": ({"hook": "train_epoch_start", "epoch": 2}, 8),
    # during epoch 1's validation (after step 8): the newest checkpoint is step 6's
    "during_validation": ({"hook": "validation_batch_end", "step": 8}, 6),
}
#: in the run killed after the epoch end, ``last.ckpt`` (the every-3-steps one) holds step 6
EXPLICIT_LAST_STEP = 6


class _World:
    def __init__(self, world_size: int, global_rank: int = 0) -> None:
        self.world_size, self.global_rank = world_size, global_rank


@pytest.mark.parametrize("total", [40, 10, 7])
def test_one_process_draws_stay_torch_random_sampler_stream(total: int) -> None:
    """Epoch e of the fine-tuning stream is pass e + 1 of the RandomSampler earlier releases trained on
    (with replacement unless total == len(data)), in any order of epochs (a resume replays them)."""
    from torch.utils.data import RandomSampler

    from medmae.data.sampler import EpochStreamSampler, EpochWeightedSampler
    from medmae.finetune.samples import TrainDraws, train_sampler

    data = list(range(10))
    old = train_sampler(data, total, seed=5)
    assert isinstance(old, RandomSampler)
    passes = [list(old) for _ in range(4)]
    draws = TrainDraws(data, total, seed=5)
    assert isinstance(draws, EpochStreamSampler) and issubclass(EpochWeightedSampler, EpochStreamSampler)
    for epoch in (2, 0, 3, 1, 1):
        draws.set_epoch(epoch)
        keys = list(draws)
        assert [k.position for k in keys] == passes[epoch]
        assert [(k.epoch, k.draw) for k in keys] == [(epoch, d) for d in range(total)]


def test_ddp_draws_stay_sharded_draws() -> None:
    from medmae.finetune.samples import ShardedDraws, TrainDraws, train_sampler

    data = list(range(10))
    for rank in range(2):
        old = train_sampler(data, 7, 3, _World(2, rank))
        assert isinstance(old, ShardedDraws)
        draws = TrainDraws(data, 7, 3, _World(2, rank))  # type: ignore[arg-type]
        for epoch in (1, 0):
            old.set_epoch(epoch)
            draws.set_epoch(epoch)
            keys = list(draws)
            assert [k.position for k in keys] == list(old)
            assert [k.draw for k in keys] == [rank, rank + 2, rank + 4, rank + 6]


def test_a_resumed_epoch_skips_the_trained_draws_and_a_finished_one_moves_on() -> None:
    """18 draws in batches of 4: 16 are trained (2 would be dropped), so 16 draws done end the epoch."""
    from medmae.finetune.samples import TrainDraws

    data = list(range(10))
    full = TrainDraws(data, 18, 1, batch_size=4, drop_last=True)
    assert len(full) == 16
    epochs = {e: (full.set_epoch(e), list(full))[1] for e in (0, 1)}
    position = [(0, 8)]
    resumed = TrainDraws(data, 18, 1, batch_size=4, drop_last=True)
    resumed.follow(lambda: position[0])
    resumed.set_epoch(5)  # whatever the loop's own counter says
    assert list(resumed) == epochs[0][8:]
    position[0] = (0, 16)
    assert list(resumed) == epochs[1]


def test_batches_carry_their_stream_keys_and_samples_of_their_epoch() -> None:
    from torch.utils.data import DataLoader

    from medmae.finetune.samples import KeyedCollate, KeyedSamples, PlaneDataset, TrainDraws

    label = torch.zeros(1, 16, 16, dtype=torch.long)
    label[0, 4:12, 4:12] = 1
    planes = PlaneDataset([torch.rand(1, 1, 16, 16)], (0.5, 1.0), 0.5, seed=2, labels=[label])
    draws = TrainDraws(planes, 6, 2, batch_size=3, drop_last=True)
    draws.set_epoch(3)
    loader = DataLoader(KeyedSamples(planes), batch_size=3, sampler=draws, collate_fn=KeyedCollate())
    batches = list(loader)
    assert [b["index"].tolist() for b in batches] == [[0, 1, 2], [3, 4, 5]]
    assert all(b["epoch"].tolist() == [3, 3, 3] for b in batches)
    planes.epoch = 3
    torch.testing.assert_close(batches[1]["image"][0], planes[0]["image"])
    planes.epoch = 0
    assert not torch.equal(batches[1]["image"][0], planes[0]["image"])


@pytest.fixture(scope="module")
def encoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny exported encoder (2 blocks, 32x32, patch 8) with a real pretraining preprocessing record."""
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("resume_encoder")
    mae = create_mae(
        "mae_vit_tiny_patch16",
        img_size=32,
        patch_size=8,
        embed_dim=32,
        depth=2,
        num_heads=2,
        decoder_depth=1,
        decoder_embed_dim=32,
        decoder_num_heads=2,
    )
    export_encoder(mae, out / "encoder", preprocessing=CacheDataModule(str(out / "c"), img_size=32).preprocessing())
    return out / "encoder"


def _write_csv(path: Path, rows: list[dict[str, str]]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


@pytest.fixture(scope="module")
def seg_cases(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real T1 / EPI volumes with three intensity classes as labels: two for training, one for validation."""
    d = tmp_path_factory.mktemp("resume_seg_cases")
    rows = []
    for name, src in (("anat", "anatomical.nii"), ("epi", "example4d.nii.gz"), ("moved", "reoriented_anat_moved.nii")):
        img = nib.load(str(NIB_DATA / src))
        data = np.asarray(img.dataobj, dtype=np.float32)
        data = data[..., 0] if data.ndim == 4 else data
        lo, hi = np.percentile(data, [50, 85])
        label = ((data > lo).astype(np.uint8) + (data > hi).astype(np.uint8)).astype(np.uint8)
        nib.save(nib.Nifti1Image(data, img.affine), str(d / f"{name}.nii.gz"))
        nib.save(nib.Nifti1Image(label, img.affine), str(d / f"{name}_label.nii.gz"))
        split = "val" if name == "moved" else "train"
        rows.append({"image": f"{name}.nii.gz", "label": f"{name}_label.nii.gz", "patient": name, "split": split})
    return _write_csv(d / "cases.csv", rows)


@pytest.fixture(scope="module")
def cls_cases(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Series-level classification: time points of two real EPI runs, one class per run (the last time
    point of each run validates)."""
    d = tmp_path_factory.mktemp("resume_cls_cases")
    rows = []
    for src, label, times in (("example4d.nii.gz", "e4d", 2), ("functional.nii", "func", 3)):
        img = nib.load(str(NIB_DATA / src))
        data = np.asarray(img.dataobj, dtype=np.float32)
        for t in range(times):
            name = f"{label}_t{t}"
            nib.save(nib.Nifti1Image(data[..., t], img.affine), str(d / f"{name}.nii.gz"))
            rows.append(
                {
                    "image": f"{name}.nii.gz",
                    "label": label,
                    "patient": name,
                    "split": "val" if t == times - 1 else "train",
                }
            )
    return _write_csv(d / "labels.csv", rows)


def _config(task: str, encoder: Path, cases: Path, workers: int, callbacks: list[dict]) -> dict:
    data = {
        "csv": str(cases),
        "batch_size": 4,
        "num_workers": workers,
        "samples_per_epoch": 18,
        "crop_scale": [0.5, 1.0],
        "hflip_prob": 0.5,
        "augment": {"rotate_deg": 20.0, "scale": [0.9, 1.1], "gamma": [0.8, 1.25], "bias_field": 0.05},
    }
    if task == "seg":
        model = {
            "init": f"medmae:{encoder}",
            "num_classes": 3,
            "decoder": "light",
            "feature_size": 8,
            "lr": 3.0e-3,
            "warmup_steps": 2,
        }
    else:
        model = {
            "init": f"medmae:{encoder}",
            "task": "binary",
            "classes": ["e4d", "func"],
            "level": "series",
            "lr": 3.0e-3,
            "warmup_steps": 2,
        }
        data.update({"label_column": "label", "planes_per_series": 4, "max_planes": 8})
    every_steps = {"every_n_train_steps": 3, "save_top_k": -1, "save_last": True}
    monitor = {"val/dice": "max"} if task == "seg" else {"val/loss": "min"}
    best = {"monitor": next(iter(monitor)), "mode": next(iter(monitor.values())), "save_last": True}
    return {
        "seed_everything": 0,
        "model": model,
        "data": data,
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
                "init_args": {"save_dir": "runs", "name": task},
            },
            "callbacks": [
                {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": every_steps},
                {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": best},
                *callbacks,
            ],
        },
    }


def _finetune(
    task: str,
    work: Path,
    encoder: Path,
    cases: Path,
    workers: int,
    log: str,
    kill: dict | None = None,
    ckpt_path: str | None = None,
) -> subprocess.CompletedProcess:
    callbacks = [{"class_path": "tests.train.resume_helpers.StepLog", "init_args": {"path": log}}]
    if kill is not None:
        callbacks.append({"class_path": "tests.train.resume_helpers.KillAt", "init_args": kill})
    config = work / f"{Path(log).stem}.yaml"
    config.write_text(yaml.safe_dump(_config(task, encoder, cases, workers, callbacks)))
    cmd = [sys.executable, "-m", "medmae.cli", f"finetune-{task}", "--config", str(config)]
    if ckpt_path is not None:
        cmd += ["--ckpt_path", ckpt_path]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=600)


def _steps(path: Path) -> dict[int, dict]:
    return {r["step"]: r for r in (json.loads(line) for line in path.read_text().splitlines())}


def _adam_steps(ckpt: Path) -> set[int]:
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["optimizer_states"][0]["state"]
    return {int(s["step"]) for s in state.values()}


def _tensorboard(version: Path) -> list[tuple[int, float]]:
    """``(step, value)`` of ``train/loss`` in the newest event file of a version folder (the last run's)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    newest = max(version.glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime_ns)
    acc = EventAccumulator(str(newest), size_guidance={"scalars": 0})
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars("train/loss")]


Runs = Callable[[str, str, int], Path]


def _runs(tmp_path_factory: pytest.TempPathFactory, encoder: Path, seg_cases: Path, cls_cases: Path):
    """Module-cached runs per (kind, task, workers): ``uninterrupted`` or killed at a :data:`KILLS` key."""
    done: dict[tuple[str, str, int], Path] = {}

    def get(kind: str, task: str, workers: int) -> Path:
        if (kind, task, workers) not in done:
            work = tmp_path_factory.mktemp(f"{kind}_{task}_{workers}")
            cases = seg_cases if task == "seg" else cls_cases
            if kind == "uninterrupted":
                proc = _finetune(task, work, encoder, cases, workers, str(work / "steps.jsonl"))
                assert proc.returncode == 0, proc.stderr[-3000:]
                assert sorted(_steps(work / "steps.jsonl")) == list(range(1, MAX_STEPS + 1))
            else:
                proc = _finetune(task, work, encoder, cases, workers, str(work / "killed.jsonl"), kill=KILLS[kind][0])
                assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
            done[kind, task, workers] = work
        return done[kind, task, workers]

    return get


@pytest.fixture(scope="module")
def runs(tmp_path_factory, encoder, seg_cases, cls_cases) -> Runs:
    return _runs(tmp_path_factory, encoder, seg_cases, cls_cases)


def _resume(task: str, killed: Path, tmp_path: Path, encoder: Path, cases: Path, workers: int, ckpt_path: str) -> Path:
    """Resume a copy of a killed run (``ckpt_path``: ``last`` or a path relative to the run folder)."""
    work = tmp_path / "run"
    shutil.copytree(killed, work)
    resumed = _finetune(task, work, encoder, cases, workers, str(work / "resumed.jsonl"), ckpt_path=ckpt_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return work


def _last(version: Path) -> Path:
    """The run's final checkpoint: the highest-step ``last*.ckpt`` (one per ModelCheckpoint)."""
    lasts = sorted(version.glob("checkpoints/last*.ckpt"))
    return max(lasts, key=lambda p: torch.load(p, map_location="cpu", weights_only=True)["global_step"])


def _check_exact(task: str, work: Path, reference: Path, ckpt_step: int, version: str = "version_0") -> None:
    """The killed + resumed run took the uninterrupted run's steps, draws, losses and optimizer state;
    ``version``: the logger version the resumed run wrote."""
    resumed = work / "runs" / task / version
    ref_version = reference / "runs" / task / "version_0"
    last = _last(resumed)
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == MAX_STEPS
    assert _adam_steps(last) == _adam_steps(_last(ref_version)) == {MAX_STEPS}

    ref = _steps(reference / "steps.jsonl")
    before, after = _steps(work / "killed.jsonl"), _steps(work / "resumed.jsonl")
    assert sorted(after) == list(range(ckpt_step + 1, MAX_STEPS + 1))
    for step, record in [*before.items(), *after.items()]:
        expected = ref[step]
        assert (record["epoch"], record["draws"]) == (expected["epoch"], expected["draws"]), step
        # bit for bit, whatever num_workers
        losses = float.fromhex(record["loss"]), float.fromhex(expected["loss"])
        assert record["loss"] == expected["loss"], (step, losses)
    # TensorBoard: the resumed run logged the uninterrupted run's steps and values from the checkpoint on
    reference_curve = _tensorboard(ref_version)
    assert [s for s, _ in reference_curve] == list(range(MAX_STEPS))  # Lightning logs step k + 1 at k
    assert _tensorboard(resumed) == reference_curve[ckpt_step:]


def test_ckpt_path_last_continues_the_killed_runs_version(
    tmp_path: Path, encoder: Path, seg_cases: Path, runs: Runs
) -> None:
    """Row 11: `--ckpt_path last` after a SIGKILL resumes the run from its newest checkpoint (here the
    validation-end one of epoch 1) in the same version folder, exactly."""
    work = _resume("seg", runs("after_epoch_end", "seg", 0), tmp_path, encoder, seg_cases, 0, "last")
    assert sorted(p.name for p in (work / "runs" / "seg").iterdir()) == ["version_0"]
    assert min(_steps(work / "resumed.jsonl")) == KILLS["after_epoch_end"][1] + 1
    _check_exact("seg", work, runs("uninterrupted", "seg", 0), KILLS["after_epoch_end"][1])


def test_resume_from_explicit_checkpoint_is_exact(tmp_path: Path, encoder: Path, seg_cases: Path, runs: Runs) -> None:
    """Row 12: resumed from version_0's last.ckpt by path, mid-epoch (a new logger version, as `medmae fit`
    does): global step, Adam step, TensorBoard steps and every loss are the uninterrupted run's."""
    work = _resume(
        "seg",
        runs("after_epoch_end", "seg", 0),
        tmp_path,
        encoder,
        seg_cases,
        0,
        "runs/seg/version_0/checkpoints/last.ckpt",
    )
    _check_exact("seg", work, runs("uninterrupted", "seg", 0), EXPLICIT_LAST_STEP, version="version_1")


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("task", ["seg", "cls"])
@pytest.mark.parametrize("where", sorted(KILLS))
def test_resume_after_sigkill_is_exact_everywhere(
    where: str, task: str, workers: int, tmp_path: Path, encoder: Path, seg_cases: Path, cls_cases: Path, runs: Runs
) -> None:
    cases = seg_cases if task == "seg" else cls_cases
    work = _resume(task, runs(where, task, workers), tmp_path, encoder, cases, workers, "last")
    assert sorted(p.name for p in (work / "runs" / task).iterdir()) == ["version_0"]
    _check_exact(task, work, runs("uninterrupted", task, workers), KILLS[where][1])
