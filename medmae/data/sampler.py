"""Deterministic weighted sampling whose keys carry the epoch to the (possibly persistent) workers.

Each epoch :class:`EpochWeightedSampler` draws ``samples_per_epoch`` positions with replacement from a
:class:`~medmae.data.index.SliceIndex` (series by weight, then a slice uniformly) with
``numpy.random.default_rng([seed, 2, epoch])``, numbers the draws ``0 .. samples_per_epoch - 1`` and
hands rank ``r`` of ``R`` the draws ``r, r + R, r + 2R, ...`` (the remainder of ``samples_per_epoch / R``
is dropped so every rank takes the same number of steps). It yields :class:`SampleKey` tuples
``(epoch, draw, position)``; the dataset seeds each sample's RNG from ``(seed, epoch, draw)``, so a
sample depends on nothing a worker holds: results are the same for any ``num_workers``, with or
without ``persistent_workers``, and change from epoch to epoch.

It subclasses ``torch.utils.data.DistributedSampler`` so that Lightning (``use_distributed_sampler``)
leaves it in place and calls :meth:`set_epoch` on it every epoch, on any Lightning version. Replica
count and rank default to the initialised ``torch.distributed`` process group (1 and 0 without one).
With a plain DataLoader, call ``set_epoch(e)`` like for any ``DistributedSampler``; if ``set_epoch`` is
never called, each new iteration advances the epoch by one by itself.

Exact resume: :meth:`EpochWeightedSampler.resume_at` makes the next iteration continue an epoch after
the draws already trained (``state_dict`` / ``load_state_dict`` carry the same position). The position
is rank-independent (draws over all ranks), so a run may even resume on another number of devices.
This machinery lives in :class:`EpochStreamSampler`, which fine-tuning's training stream
(:class:`medmae.finetune.samples.TrainDraws`) subclasses too: only ``epoch_positions`` differs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence, Sized
from typing import NamedTuple

import numpy as np
import torch.distributed as dist
from torch.utils.data import DistributedSampler

from medmae.data.index import SliceIndex

#: First entries of the ``default_rng`` seed lists, one per random stream (never reused for another).
STREAM_TRAIN_SAMPLE = 0
STREAM_FIXED_SAMPLE = 1
STREAM_SAMPLER = 2
STREAM_VAL_POSITIONS = 3
STREAM_AUGMENT = 4  # data.augment's per-batch draws (medmae.data.augment)


class SampleKey(NamedTuple):
    """What the sampler yields for one training sample."""

    epoch: int
    draw: int  # number of the draw within the epoch, over all ranks
    position: int  # flat position in the SliceIndex (fine-tuning: the dataset item)


def distributed_context() -> tuple[int, int]:
    """``(num_replicas, rank)`` of the initialised process group, or ``(1, 0)``."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


class EpochStreamSampler(DistributedSampler):
    """Base of the resumable training streams: numbered draws per ``(seed, epoch)``, sharded by rank.

    A subclass gives :meth:`epoch_positions` (what draw ``d`` of an epoch takes, a pure function of
    ``(seed, epoch)``, over all ranks); this class yields :class:`SampleKey` ``(epoch, draw, position)``
    for this rank's draws ``rank, rank + R, ...`` below ``total_size = num_samples * R`` and holds the
    resume machinery (:meth:`resume_at`, :meth:`follow`, ``state_dict``) shared by pretraining
    (:class:`EpochWeightedSampler`) and fine-tuning (:class:`medmae.finetune.samples.TrainDraws`).
    """

    def __init__(self, dataset: Sized, num_samples: int, seed: int, num_replicas: int, rank: int) -> None:
        super().__init__(
            dataset,  # type: ignore[arg-type]
            num_replicas=num_replicas,
            rank=rank,
            shuffle=True,
            seed=seed,
            drop_last=True,
        )
        self.num_samples = int(num_samples)
        self.total_size = self.num_samples * self.num_replicas
        self._explicit_epoch = False
        self._resume: tuple[int, int] | None = None
        self._position_fn: Callable[[], tuple[int, int] | None] | None = None

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self._explicit_epoch = True

    def resume_at(self, epoch: int, draws_done: int) -> None:
        """Make the next iteration continue ``epoch`` after its first ``draws_done`` draws (all ranks).

        The pending position wins over a later :meth:`set_epoch` for that one iteration (Lightning
        calls ``set_epoch`` with its own epoch counter, which after a restore may be off by one); a
        finished epoch (``draws_done >= total_size``) resumes at the start of ``epoch + 1``.
        """
        if epoch < 0 or draws_done < 0:
            raise ValueError(f"resume position must be >= 0, got epoch {epoch!r}, draws_done {draws_done!r}")
        epoch, draws_done = int(epoch), int(draws_done)
        if draws_done >= self.total_size:
            epoch, draws_done = epoch + 1, 0
        self._resume = (epoch, draws_done)
        self.epoch = epoch
        self._explicit_epoch = True

    def follow(self, position_fn: Callable[[], tuple[int, int] | None]) -> None:
        """Start every iteration right after the position ``position_fn()`` returns.

        ``position_fn`` gives ``(epoch, draws_done)`` of the last batch actually trained (or None before
        the first one). Each new iteration then continues that epoch, or starts ``epoch + 1`` when it
        was finished, whatever epoch number the training loop passes to :meth:`set_epoch`: iterators
        that a loop creates and drops without training on them change nothing, and a loop whose own
        epoch counter is off by one after a restore (Lightning) cannot shift the data.
        """
        self._position_fn = position_fn

    def state_dict(self) -> dict[str, int]:
        """The position the next iteration starts from (epoch, draws over all ranks already taken)."""
        epoch, draws = self._resume if self._resume is not None else (int(self.epoch), 0)
        return {"epoch": epoch, "draws_done": draws}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.resume_at(int(state["epoch"]), int(state["draws_done"]))

    def __iter__(self) -> Iterator[SampleKey]:
        start = self.rank
        position = self._position_fn() if self._position_fn is not None else None
        if self._resume is None and position is not None:
            epoch, draws_done = position
            self._resume = (epoch + 1, 0) if draws_done >= self.total_size else (epoch, draws_done)
        if self._resume is not None:
            (epoch, draws_done), self._resume = self._resume, None
            # this rank's draws are rank, rank + R, ...: skip those below draws_done
            start = -(-(draws_done - self.rank) // self.num_replicas) * self.num_replicas + self.rank
            start = max(start, self.rank)
        else:
            epoch = int(self.epoch)
        if not self._explicit_epoch:
            self.epoch = epoch + 1
        positions = self.epoch_positions(epoch)
        for draw in range(start, self.total_size, self.num_replicas):
            yield SampleKey(epoch, draw, int(positions[draw]))

    def __len__(self) -> int:
        return self.num_samples

    def epoch_positions(self, epoch: int) -> Sequence[int]:
        """What each draw ``0 .. total_size - 1`` of ``epoch`` takes (every rank's, in draw order)."""
        raise NotImplementedError


class EpochWeightedSampler(EpochStreamSampler):
    """Weighted sampling with replacement, reproducible per ``(seed, epoch)``, sharded by rank.

    Args:
        index: the slice index to draw from (its weights define the policy).
        samples_per_epoch: draws per epoch over all ranks; default ``len(index)``.
        seed: base seed (>= 0).
        num_replicas: number of ranks; default from ``torch.distributed`` (1 without a process group).
        rank: this rank; default from ``torch.distributed`` (0 without a process group).
        batch_size: the loader's batch size when it drops the last partial batch (``drop_last``): each
            rank then yields only the draws that fill whole batches, so the last trained batch ends the
            epoch. Without it an epoch whose draws per rank are not a multiple of the batch would end
            "unfinished" in the stream's position, and every later epoch would hold only its remainder
            (no batch at all). The positions drawn do not depend on it.

    Examples::

        sampler = EpochWeightedSampler(dataset.index, seed=0)
        loader = DataLoader(dataset, batch_size=64, sampler=sampler, num_workers=8)
        for epoch in range(epochs):
            sampler.set_epoch(epoch)
            for batch in loader: ...
    """

    def __init__(
        self,
        index: SliceIndex,
        samples_per_epoch: int | None = None,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
        batch_size: int = 1,
    ) -> None:
        if len(index) == 0:
            raise ValueError("cannot sample from an empty slice index")
        if samples_per_epoch is not None and samples_per_epoch < 1:
            raise ValueError(f"samples_per_epoch must be >= 1, got {samples_per_epoch!r}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed!r}")
        world, this_rank = distributed_context()
        num_replicas = world if num_replicas is None else num_replicas
        rank = this_rank if rank is None else rank
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
        samples = int(samples_per_epoch or len(index))
        per_rank = samples // num_replicas
        super().__init__(index, per_rank // batch_size * batch_size, seed, num_replicas, rank)
        self.index = index
        self.samples_per_epoch = samples
        #: positions drawn per epoch (all ranks): ``total_size`` plus the draws no whole batch takes
        self.draws_per_epoch = per_rank * num_replicas

    def epoch_positions(self, epoch: int) -> np.ndarray:
        """All positions drawn in ``epoch`` (every rank's, in draw order; ``draws_per_epoch`` of them)."""
        rng = np.random.default_rng([self.seed, STREAM_SAMPLER, epoch])
        return np.asarray(self.index.draw(rng, self.draws_per_epoch))
