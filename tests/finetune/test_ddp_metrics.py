"""Validation metrics under DDP: every rank's cases are gathered and the sampler's repeats count once.

With 5 validation cases on 2 ranks, Lightning's ``DistributedSampler`` gives rank 0 cases 0, 2, 4 and
rank 1 cases 1, 3 and case 0 again. ``val/dice`` and ``val/auroc`` must still be those of the 5 cases,
on every rank, as a single process computes them.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from monai.metrics import DiceMetric
from monai.networks.utils import one_hot
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from medmae.data import CacheDataModule
from medmae.export import export_encoder
from medmae.finetune.classify import ClassificationModule
from medmae.finetune.gather import gather_unique, val_case_key
from medmae.finetune.seg_data import PreparedCase
from medmae.finetune.segment import SegmentationModule, predict_case
from medmae.models import create_mae

pytestmark = pytest.mark.usefixtures("one_thread")

N_CASES = 5  # odd: the distributed sampler repeats case 0 on rank 1


# ----------------------------------------------------------------------------- the gather itself


class _Range(Dataset):
    def __len__(self) -> int:
        return N_CASES

    def __getitem__(self, i: int) -> int:
        return i


def _rank_loader(rank: int) -> DataLoader:
    """What Lightning gives rank ``rank`` of 2 for a one-case-per-batch validation loader."""
    return DataLoader(_Range(), batch_size=1, sampler=DistributedSampler(_Range(), 2, rank, shuffle=False))


def _rank_items(rank: int) -> list[tuple[tuple[int, ...], str]]:
    loader = _rank_loader(rank)
    trainer = SimpleNamespace(val_dataloaders=loader, global_rank=rank)
    return [(val_case_key(trainer, b), f"case{int(x)}") for b, x in enumerate(loader)]


def test_case_keys_follow_the_distributed_sampler_and_repeats_count_once() -> None:
    ranks = [_rank_items(0), _rank_items(1)]
    assert [k for k, _ in ranks[0]] == [(0, 0), (0, 2), (0, 4)]
    assert [k for k, _ in ranks[1]] == [(0, 1), (0, 3), (0, 0)]  # the repeat carries its original's key
    assert gather_unique(ranks[0] + ranks[1]) == [f"case{i}" for i in range(N_CASES)]
    # a loader list (several validation sets) and a loader without a sampler
    listed = SimpleNamespace(val_dataloaders=[_rank_loader(1)], global_rank=1)
    assert val_case_key(listed, 2) == (0, 0)
    assert val_case_key(SimpleNamespace(val_dataloaders=[[1, 2]], global_rank=1), 1) == (1, 1, 1)


def _gather_worker(rank: int, init_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        got = gather_unique(_rank_items(rank))
    finally:
        dist.destroy_process_group()
    Path(out, f"rank{rank}.json").write_text(json.dumps(got))


def test_gather_unique_across_two_gloo_processes(tmp_path: Path) -> None:
    # fork, not spawn: a spawned child re-imports this module (Lightning, MONAI: ~25 s on 2 cores)
    mp.start_processes(_gather_worker, (str(tmp_path / "init"), str(tmp_path)), nprocs=2, start_method="fork")
    for rank in (0, 1):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == [f"case{i}" for i in range(N_CASES)]


# ----------------------------------------------------------------------------- the modules, 1 vs 2 ranks


def _first(batch: list) -> object:
    """One case per validation batch, as the fine-tuning data modules collate it."""
    return batch[0]


@pytest.fixture(scope="module")
def encoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("ddp_encoder")
    mae = create_mae("mae_vit_tiny_patch16", img_size=32, patch_size=8, embed_dim=64, depth=3, num_heads=2,
                     decoder_depth=1, decoder_embed_dim=32, decoder_num_heads=2)
    export_encoder(mae, out / "encoder", preprocessing=CacheDataModule(str(out / "none"), img_size=32).preprocessing())
    return out / "encoder"


def _seg_cases() -> list[PreparedCase]:
    """5 small volumes; the truth of case 1 lacks class 2 and that of case 3 lacks class 1."""
    g = torch.Generator().manual_seed(1)
    cases = []
    for i in range(N_CASES):
        images = torch.rand(3, 1, 32, 32, generator=g)
        truth = (torch.nn.functional.interpolate(images, size=(20, 28), mode="bilinear")[:, 0] * 3).clamp(0, 2)
        truth = truth.to(torch.uint8).numpy()
        if i == 1:
            truth[truth == 2] = 0
        if i == 3:
            truth[truth == 1] = 0
        cases.append(PreparedCase(images, torch.zeros(3, 32, 32, dtype=torch.long), truth, (20, 28)))
    return cases


class _SeriesSet(Dataset):
    """Validation series as the classification data module yields them (one series per batch)."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(2)
        self.items = [
            {"image": torch.rand(4, 1, 32, 32, generator=g) * (0.5 + 0.1 * i), "target": torch.tensor([[float(t)]])}
            for i, t in enumerate((1, 0, 0, 1, 0))
        ]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.items[i]


class _Record(pl.Callback):
    """Each rank writes the metrics it logged (rank 1's stay invisible to the spawning process otherwise)."""

    def __init__(self, out: Path) -> None:
        self.out = out

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(metrics))


def _validate(module: pl.LightningModule, loader: DataLoader, out: Path, devices: int) -> list[dict[str, float]]:
    out.mkdir(parents=True)
    trainer = pl.Trainer(
        accelerator="cpu", devices=devices, strategy="ddp_spawn" if devices > 1 else "auto", logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=out,
        callbacks=[_Record(out)],
    )
    trainer.validate(module, dataloaders=loader, verbose=False)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(devices)]


def _monai_dice(module: SegmentationModule, cases: list[PreparedCase], order: list[int]) -> dict[str, float]:
    """The oracle: MONAI DiceMetric over the cases in ``order`` (mean_batch, then the mean over classes);
    ``val/dice_empty1`` from the same with ``ignore_empty=False``."""
    metric = DiceMetric(include_background=False, reduction="mean_batch", ignore_empty=True)
    empty1 = DiceMetric(include_background=False, reduction="mean_batch", ignore_empty=False)
    module.eval()
    for i in order:
        pred, truth = predict_case(module.net, cases[i], module.preprocessing)
        y_pred, y = (one_hot(torch.from_numpy(a.astype(np.int64))[None, None], 3) for a in (pred, truth))
        metric(y_pred, y)
        empty1(y_pred, y)
    per_class = metric.aggregate().tolist()
    return {"val/dice_class1": per_class[0], "val/dice_class2": per_class[1], "val/dice": float(np.mean(per_class)),
            "val/dice_empty1": float(empty1.aggregate().mean())}


def _seg_setup(encoder: Path) -> tuple[SegmentationModule, list[PreparedCase], DataLoader]:
    torch.manual_seed(0)
    seg = SegmentationModule(f"random:{encoder}", 3, decoder="light")
    cases = _seg_cases()
    return seg, cases, DataLoader(cases, batch_size=1, collate_fn=_first)


def _cls_setup(encoder: Path) -> tuple[ClassificationModule, torch.Tensor, torch.Tensor, DataLoader]:
    """The module, its series probabilities and targets, and the validation loader."""
    torch.manual_seed(0)
    cls = ClassificationModule(f"random:{encoder}", task="binary", drop_path_rate=0.0).eval()
    data = _SeriesSet()
    with torch.no_grad():
        probs = torch.stack([cls.series_probabilities(s["image"])[0] for s in data.items])
    target = torch.tensor([int(s["target"]) for s in data.items])
    return cls, probs, target, DataLoader(data, batch_size=1, collate_fn=_first)


def test_one_process_validation_logs_monai_dice_and_the_empty_inclusive_variant(
    tmp_path: Path, encoder: Path
) -> None:
    seg, cases, loader = _seg_setup(encoder)
    one = _validate(seg, loader, tmp_path / "seg1", 1)[0]
    for key, value in _monai_dice(seg, cases, list(range(N_CASES))).items():
        assert one[key] == pytest.approx(value, abs=1e-6), key
    assert one["val/dice_empty1"] != one["val/dice"]  # cases 1 and 3 lack a class in their truth


@pytest.mark.slow  # two ddp_spawn runs of two processes each (~1 min on 2 cores)
def test_two_rank_validation_equals_one_process(
    tmp_path: Path, encoder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the spawned ranks compute exactly as this process
    # segmentation: val/dice of 2 ranks = of 1 process = MONAI's DiceMetric over the 5 cases
    seg, cases, loader = _seg_setup(encoder)
    expected = _monai_dice(seg, cases, list(range(N_CASES)))
    naive = _monai_dice(seg, cases, [0, 2, 4, 1, 3, 0])  # case 0 twice: what a plain gather would score
    assert abs(naive["val/dice"] - expected["val/dice"]) > 1e-3  # the test can tell the difference
    one = _validate(seg, loader, tmp_path / "seg1", 1)[0]
    two = _validate(seg, loader, tmp_path / "seg2", 2)
    for key, value in expected.items():
        assert one[key] == pytest.approx(value, abs=1e-6), key
        for rank in (0, 1):
            assert two[rank][key] == pytest.approx(one[key], abs=1e-9), (rank, key)

    # classification: val/auroc, val/acc and val/loss of 2 ranks = of 1 process over the 5 series
    from torchmetrics.functional.classification import binary_auroc

    cls, probs, target, loader = _cls_setup(encoder)
    auroc = float(binary_auroc(probs, target))
    naive_auroc = float(binary_auroc(torch.cat([probs, probs[:1]]), torch.cat([target, target[:1]])))
    assert abs(naive_auroc - auroc) > 1e-3
    one = _validate(cls, loader, tmp_path / "cls1", 1)[0]
    two = _validate(cls, loader, tmp_path / "cls2", 2)
    assert one["val/auroc"] == pytest.approx(auroc, abs=1e-6)
    for rank in (0, 1):
        for key in ("val/auroc", "val/acc", "val/loss"):
            assert two[rank][key] == pytest.approx(one[key], abs=1e-6), (rank, key)


def test_a_class_no_validation_volume_holds_is_named_and_left_out(tmp_path: Path, encoder: Path) -> None:
    seg, cases, _ = _seg_setup(encoder)
    for case in cases:
        case.label_stack[case.label_stack == 2] = 0
    loader = DataLoader(cases, batch_size=1, collate_fn=_first)
    with pytest.warns(UserWarning, match=r"class\(es\) \[2\] have no voxel in any of the 5 validation volumes"):
        one = _validate(seg, loader, tmp_path / "seg", 1)[0]
    assert "val/dice_class2" not in one and one["val/dice"] == one["val/dice_class1"]
