"""Fine-tuning samples: one plane dataset and one epoch hook for both tasks (issue 16, item 3), joint
image/label augmentation, and training draws that DDP ranks share (issue 16, item 8)."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DistributedSampler, RandomSampler

from medmae.data.options import AugmentOptions
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


def _blocks() -> tuple[torch.Tensor, torch.Tensor]:
    """A 3-class label plane and a 2-channel image that spells it as intensities (label / 2)."""
    label = torch.zeros(32, 32, dtype=torch.long)
    label[4:20, 6:14] = 1
    label[18:30, 16:30] = 2
    return (label.float() / 2)[None].repeat(2, 1, 1), label


def test_data_augment_turns_and_zooms_the_label_with_its_image() -> None:
    image, label = _blocks()
    geometry = AugmentOptions(rotate_deg=90, scale=(0.8, 1.25))
    data = PlaneDataset([image[None]], (1.0, 1.0), 0.0, seed=3, labels=[label[None]], extra=geometry)
    moved = 0
    for epoch in range(8):
        data.epoch = epoch
        item = data[0]
        seen = item["label"][0]
        assert seen.dtype == torch.long and set(seen.unique().tolist()) <= {0, 1, 2}
        # the image (bilinear) and the label (nearest) went through the same rotation and zoom
        agree = (torch.round(item["image"][0] * 2).long() == seen).float().mean()
        assert agree > 0.93, (epoch, float(agree))
        assert torch.equal(item["image"][0], item["image"][1])  # the channels of a sample move together
        moved += int(not torch.equal(seen, label))
        torch.testing.assert_close(data[0]["image"], item["image"])  # a pure function of (seed, epoch, index)
    assert moved >= 7


def test_data_augment_off_leaves_every_sample_as_it_was() -> None:
    image, label = _blocks()
    plain = PlaneDataset([image[None]], (0.3, 1.0), 0.5, seed=1, labels=[label[None]])
    off = PlaneDataset([image[None]], (0.3, 1.0), 0.5, seed=1, labels=[label[None]], extra=AugmentOptions())
    on = PlaneDataset(
        [image[None]], (0.3, 1.0), 0.5, seed=1, labels=[label[None]], extra=AugmentOptions(gamma=(0.5, 2.0))
    )
    for epoch in range(4):
        plain.epoch = off.epoch = on.epoch = epoch
        assert torch.equal(plain[0]["image"], off[0]["image"]) and torch.equal(plain[0]["label"], off[0]["label"])
        # an intensity-only setting changes the image, never the label, and stays in [0, 1]
        assert torch.equal(on[0]["label"], plain[0]["label"]) and not torch.equal(on[0]["image"], plain[0]["image"])
        assert 0.0 <= float(on[0]["image"].min()) and float(on[0]["image"].max()) <= 1.0


def test_data_augment_draws_once_per_series_at_series_level() -> None:
    from medmae.finetune.cls_data import PreparedSeries

    image, _ = _blocks()
    series = PreparedSeries(image[None].repeat(4, 1, 1, 1), torch.tensor([1.0]))
    options = AugmentOptions(rotate_deg=30, scale=(0.8, 1.25), gamma=(0.7, 1.4), bias_field=0.1)
    item = SeriesDataset([series], None, seed=0, extra=options)[0]
    assert item["images"].shape == (4, 2, 32, 32)
    assert all(torch.equal(item["images"][0], plane) for plane in item["images"])
    assert not torch.equal(item["images"][0], image)


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
