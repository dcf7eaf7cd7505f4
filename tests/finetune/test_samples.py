"""Fine-tuning samples: one plane dataset and one epoch hook for both tasks (issue 16, item 3), joint
image/label augmentation, and training draws that DDP ranks share (issue 16, item 8)."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DistributedSampler, RandomSampler

from medmae.finetune.classify import ClassificationModule
from medmae.finetune.cls_data import SeriesDataset
from medmae.finetune.samples import EpochDataset, EpochHook, PlaneDataset, ShardedDraws, augment, train_sampler
from medmae.finetune.seg_data3d import PatchDataset
from medmae.finetune.segment import SegmentationModule


def test_one_plane_dataset_and_one_epoch_hook_serve_both_tasks() -> None:
    assert issubclass(SegmentationModule, EpochHook) and issubclass(ClassificationModule, EpochHook)
    for dataset in (PlaneDataset, SeriesDataset, PatchDataset):
        assert issubclass(dataset, EpochDataset)
    import medmae.finetune.cls_data as cls_data
    import medmae.finetune.seg_data as seg_data

    assert seg_data.PlaneDataset is cls_data.PlaneDataset is PlaneDataset


def test_augmentation_moves_label_planes_with_their_image() -> None:
    """Blocks of a label plane, written into the image as intensities: after any crop + flip they still agree."""
    label = torch.zeros(32, 32, dtype=torch.long)
    label[4:20, 6:14] = 1
    label[18:30, 16:30] = 2
    image = (label.float() / 2)[None].repeat(2, 1, 1)
    data = PlaneDataset([image[None]], (0.3, 1.0), 0.5, seed=1, labels=[label[None]])
    flips = 0
    for epoch in range(8):
        data.epoch = epoch
        item = data[0]
        seen = item["label"][0]
        assert item["image"].shape == (2, 32, 32) and seen.shape == (32, 32)
        agree = (torch.round(item["image"][0] * 2).long() == seen).float().mean()
        assert agree > 0.93, (epoch, float(agree))
        flips += int(not torch.equal(seen, label))
    assert flips > 0
    data.epoch = 0
    # classification planes carry their series' target and the same augmentation of the image alone
    target = torch.tensor([1.0])
    cls = PlaneDataset([image[None]], (0.3, 1.0), 0.5, seed=1, targets=[target])
    torch.testing.assert_close(cls[0]["image"], data[0]["image"])
    assert torch.equal(cls[0]["target"], target)
    rng = np.random.default_rng([1, 0, 0])
    torch.testing.assert_close(augment(image, rng, 0.5, (0.3, 1.0))[0], cls[0]["image"])


class _World:
    def __init__(self, world_size: int, global_rank: int = 0) -> None:
        self.world_size, self.global_rank = world_size, global_rank


def test_ddp_ranks_share_samples_per_epoch_draws() -> None:
    """Lightning keeps a DistributedSampler: the ranks' draws add up to samples_per_epoch, disjointly."""
    data = list(range(10))
    assert isinstance(train_sampler(data, 40, 0), RandomSampler)  # one process: torch's stream, unchanged
    for total in (40, 10, 7):
        ranks = [train_sampler(data, total, 3, _World(2, r)) for r in range(2)]
        assert all(isinstance(s, DistributedSampler) and isinstance(s, ShardedDraws) for s in ranks)
        draws = [list(s) for s in ranks]
        assert len(draws[0]) == len(draws[1]) == len(ranks[0]) == -(-total // 2)
        merged = [d for pair in zip(*draws, strict=True) for d in pair][:total]
        assert all(0 <= d < 10 for d in merged)
        if total == 10:  # one epoch of each item once: a permutation, split across ranks
            assert sorted(merged) == data
        for s in ranks:
            s.set_epoch(1)
        assert [list(s) for s in ranks] != draws  # a new epoch, new draws
        for s in ranks:
            s.set_epoch(0)
        assert [list(s) for s in ranks] == draws  # a function of (seed, epoch)
    assert np.isclose(np.mean(list(train_sampler(data, 4000, 1, _World(2, 0)))), 4.5, atol=0.3)
