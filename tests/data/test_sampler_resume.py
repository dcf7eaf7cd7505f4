"""The sampler's resume position: continue an epoch after the draws already trained, on any rank."""

from __future__ import annotations

from torch.utils.data import DataLoader

from medmae.data import EpochWeightedSampler
from medmae.data.index import SliceIndex
from medmae.data.sampler import SampleKey
from tests.data.conftest import shape_row


def _index() -> SliceIndex:
    return SliceIndex([shape_row("a", (5, 32, 32)), shape_row("b", (3, 32, 32))], "axial", 0.5)


def test_resume_at_continues_the_epoch_on_every_rank() -> None:
    for replicas in (1, 2):
        for rank in range(replicas):
            full = list(EpochWeightedSampler(_index(), 12, seed=3, num_replicas=replicas, rank=rank).__iter__())
            sampler = EpochWeightedSampler(_index(), 12, seed=3, num_replicas=replicas, rank=rank)
            sampler.set_epoch(0)
            sampler.resume_at(0, 8)
            assert list(sampler) == [k for k in full if k.draw >= 8]
            sampler.set_epoch(1)
            assert [k.epoch for k in sampler] == [1] * (12 // replicas)  # one-shot: later epochs are whole


def test_a_finished_epoch_resumes_at_the_next_and_state_round_trips() -> None:
    sampler = EpochWeightedSampler(_index(), 8, seed=0)
    sampler.load_state_dict({"epoch": 4, "draws_done": 8})
    assert sampler.state_dict() == {"epoch": 5, "draws_done": 0}
    sampler.set_epoch(9)  # a loop's own (wrong) epoch number does not override the pending position
    assert {k.epoch for k in sampler} == {5}


def test_follow_starts_each_iteration_after_the_last_trained_position() -> None:
    position: list[tuple[int, int] | None] = [None]
    sampler = EpochWeightedSampler(_index(), 8, seed=0)
    sampler.follow(lambda: position[0])
    sampler.set_epoch(0)
    assert [k.draw for k in sampler] == list(range(8))
    position[0] = (0, 4)  # killed after half of epoch 0: an iterator opened now continues it
    sampler.set_epoch(1)
    assert [(k.epoch, k.draw) for k in sampler] == [(0, d) for d in range(4, 8)]
    position[0] = (0, 8)  # epoch 0 finished: the next iteration is epoch 1, whatever set_epoch said
    sampler.set_epoch(2)
    assert {k.epoch for k in sampler} == {1}


class DrawOf:
    """A dataset that returns the draw number of the sampler key it is asked for."""

    def __getitem__(self, key: SampleKey) -> int:
        return key.draw


def test_epochs_that_are_not_whole_batches_keep_training() -> None:
    """10 draws per rank and epoch, batch 4, drop_last: every epoch trains two batches, not only the first.

    The stream's position is the last *trained* draw (as ``TrainStreamPosition`` records it). Without
    ``batch_size`` the sampler took an epoch ending at draw 8 of 10 as unfinished, and every later
    iteration held only its draws 8-9: no batch at all, so training stopped after one epoch.
    """
    for replicas in (1, 2):
        position: list[tuple[int, int] | None] = [None]
        samplers = [
            EpochWeightedSampler(_index(), 10 * replicas, seed=0, num_replicas=replicas, rank=r, batch_size=4)
            for r in range(replicas)
        ]
        for sampler in samplers:
            sampler.follow(lambda p=position: p[0])
        batches_per_epoch = []
        for epoch in range(3):
            loaders = [DataLoader(DrawOf(), batch_size=4, sampler=s, drop_last=True) for s in samplers]
            for s in samplers:
                s.set_epoch(epoch)
            trained = [list(loader) for loader in loaders]
            batches_per_epoch.append([len(t) for t in trained])
            last = max(int(t[-1].max()) for t in trained)
            position[0] = (epoch, (last // replicas + 1) * replicas)
        assert batches_per_epoch == [[2] * replicas] * 3
        # the positions drawn are those of a sampler without batch_size: only the epoch's tail is not taken
        plain = EpochWeightedSampler(_index(), 10 * replicas, seed=0, num_replicas=replicas, rank=0)
        batched = EpochWeightedSampler(_index(), 10 * replicas, seed=0, num_replicas=replicas, rank=0, batch_size=4)
        assert list(batched) == list(plain)[:8]
