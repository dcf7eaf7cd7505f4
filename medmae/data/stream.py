"""Exact resume of the training stream: the datamodule remembers where the last *trained* batch came from.

The sampler's keys ``(epoch, draw)`` travel inside every batch, so the position is read from the
batch itself, on the host, before its device copy (no sync). It is saved in every checkpoint
(``state_dict``) and, on resume, the next training loader starts right after it
(:meth:`~medmae.data.sampler.EpochWeightedSampler.follow`). The same hook stamps the batch with
``step_key`` = ``(epoch, batch number in the epoch)``, from which the MAE module seeds its masks, so
a resumed run draws the very data and masks of an uninterrupted one.
"""

from __future__ import annotations

from typing import Any

#: batch entry added just before a training step: ``(epoch, batch number in the epoch)`` as host ints,
#: read from the batch's own sampler keys (the module seeds its masks from it)
STEP_KEY = "step_key"


class TrainStreamPosition:
    """LightningDataModule mixin: record, save and restore the training stream's position.

    The host class sets ``train_position = None`` and ``_num_replicas`` (ranks the sampler shards
    over) and passes :meth:`_trained_position` to its sampler's ``follow``.
    """

    train_position: dict[str, int] | None
    _num_replicas: int
    trainer: Any

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Record the sampler position of each batch the trainer is about to train on.

        Lightning calls this hook for exactly the batches that reach a training step (its fetcher's
        look-ahead batch is not counted yet), on the host, before the device copy: reading the keys
        costs no device sync. The batch's own ``(epoch, index)`` keys are the only source of truth.
        """
        trainer = self.trainer
        if trainer is not None and trainer.training and isinstance(batch, dict) and "epoch" in batch:
            epoch = int(batch["epoch"][0])
            last_draw = int(batch["index"].max())
            replicas = max(1, self._num_replicas)
            # rank r takes draws r, r+R, ...: after draw d every rank has taken d // R + 1 of its own
            self.train_position = {"epoch": epoch, "draws_done": (last_draw // replicas + 1) * replicas}
            first_draw = int(batch["index"].min())
            batch[STEP_KEY] = (epoch, first_draw // (replicas * len(batch["index"])))
        return batch

    def _trained_position(self) -> tuple[int, int] | None:
        if self.train_position is None:
            return None
        return self.train_position["epoch"], self.train_position["draws_done"]

    def state_dict(self) -> dict[str, Any]:
        """Saved in every checkpoint: the training position in the sampler's stream (no paths)."""
        return {"train_position": dict(self.train_position) if self.train_position is not None else None}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """On resume the next training loader continues right after the last trained batch."""
        position = state_dict.get("train_position")
        if position is not None:
            self.train_position = {"epoch": int(position["epoch"]), "draws_done": int(position["draws_done"])}
