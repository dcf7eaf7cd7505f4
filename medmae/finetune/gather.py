"""Validation metrics over every rank's cases, each case once (multi-GPU fine-tuning).

With ``trainer.devices > 1`` (DDP), Lightning gives each rank a ``DistributedSampler`` over the
validation set: rank ``r`` of ``W`` scores cases ``r, r + W, r + 2W, ...``, and when the number of
cases is not a multiple of ``W`` the sampler *repeats* the first cases so that every rank runs the
same number of steps. A metric computed from one rank's list therefore sees a subset, and a plain
gather of every rank's list counts the repeated cases twice.

So each validation step keys its result by the dataset index of its case, read from the sampler of
the loader being run (:func:`val_case_key`), and :func:`gather_unique` all-gathers ``(key, result)``
pairs from every rank and keeps one result per key, in index order. Every rank then computes the
same metric from the same complete list, which is what a single process computes on the same cases.

Results cross ranks pickled (``torch.distributed.all_gather_object``): pass CPU values (floats,
NumPy arrays, CPU tensors), not CUDA tensors.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any, TypeVar

import torch.distributed as dist

T = TypeVar("T")
#: a case's key: ``(0, dataset index)``, or ``(1, rank, batch_idx)`` when the loader's order is unknown
Key = tuple[int, ...]

#: per batch sampler: (its sampler's epoch, the dataset indices of every batch it yields)
_ORDER: weakref.WeakKeyDictionary[Any, tuple[Any, list[list[int]]]] = weakref.WeakKeyDictionary()


def _batches(loader: Any) -> list[list[int]] | None:
    """The dataset indices of every batch ``loader`` yields on this rank, or None if it has no sampler."""
    batch_sampler = getattr(loader, "batch_sampler", None)
    sampler = batch_sampler if batch_sampler is not None else getattr(loader, "sampler", None)
    if sampler is None:
        return None
    inner = getattr(sampler, "sampler", sampler)
    epoch = getattr(inner, "epoch", None)  # DistributedSampler: the order depends on it when shuffling
    try:
        cached = _ORDER.get(sampler)
    except TypeError:  # not weak-referenceable
        cached = None
    if cached is not None and cached[0] == epoch:
        return cached[1]
    order = [[int(i) for i in b] if isinstance(b, (list, tuple)) else [int(b)] for b in sampler]
    try:
        _ORDER[sampler] = (epoch, order)
    except TypeError:
        pass
    return order


def val_case_key(trainer: Any, batch_idx: int, dataloader_idx: int = 0) -> Key:
    """Key of validation batch ``batch_idx`` (one case per batch): ``(0, index in the dataset)``.

    The index comes from the sampler of the validation loader being run (under DDP the
    ``DistributedSampler`` Lightning put in, whose repeats then share their original's key). When
    the loader has no readable sampler or the batch holds more than one case, the key is
    ``(1, rank, batch_idx)``: unique, so nothing is dropped (and repeats, if any, count twice).
    The sampler must give the same order each time it is iterated in an epoch, as Lightning's
    validation samplers do (they never shuffle).
    """
    loader = trainer.val_dataloaders
    if isinstance(loader, dict):
        loader = list(loader.values())
    if isinstance(loader, (list, tuple)):
        loader = loader[dataloader_idx] if dataloader_idx < len(loader) else None
    batches = _batches(loader) if loader is not None else None
    if batches is not None and batch_idx < len(batches) and len(batches[batch_idx]) == 1:
        return (0, batches[batch_idx][0])
    return (1, int(trainer.global_rank), int(batch_idx))


def gather_unique(items: Sequence[tuple[Key, T]]) -> list[T]:
    """Every rank's ``(key, value)`` items, one value per key (the first seen), in key order.

    A collective under DDP: every rank must call it, with an empty list if it has no items. In a
    single process (or without an initialised process group) only the de-duplication happens.
    """
    everything: list[tuple[Key, T]] = list(items)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        parts: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(parts, everything)
        everything = [item for part in parts for item in part]
    unique: dict[Key, T] = {}
    for key, value in everything:
        unique.setdefault(tuple(key), value)
    return [unique[k] for k in sorted(unique)]
