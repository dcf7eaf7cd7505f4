"""The sampler's resume position: continue an epoch after the draws already trained, on any rank."""

from __future__ import annotations

from medmae.data import EpochWeightedSampler
from medmae.data.index import SliceIndex
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
