"""Fine-tuning checkpoints read for prediction: safe unpickling, the inference record, the network weights.

A checkpoint written by ``medmae finetune-seg`` / ``finetune-cls`` carries, besides Lightning's own
keys, one record under the task's key (``medmae_segmentation`` / ``medmae_classification``): the
encoder spec, the preprocessing rebuilt from the card, the input normalisation and ``inputs``, the
rule by which fine-tuning read its inputs (the NIfTI modality option; classification also its
plane budget). Prediction rebuilds everything from that record: no export folder, no config.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


@dataclass(frozen=True)
class FinetuneCheckpoint:
    """The parts of a fine-tuning checkpoint prediction needs."""

    path: Path
    record: dict[str, Any]
    hparams: dict[str, Any]
    net_state: dict[str, torch.Tensor]

    @property
    def inputs(self) -> dict[str, Any] | None:
        """How fine-tuning read its inputs (absent in checkpoints written before it was recorded)."""
        return self.record.get("inputs")


def read_finetune_checkpoint(path: str | Path, key: str, command: str) -> FinetuneCheckpoint:
    """Load ``path`` with ``weights_only`` (no code runs) and check it is a ``command`` checkpoint.

    Raises:
        ValueError: one line naming the file: unloadable, or written by something else.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling / zip / truncation errors differ by torch version
        raise ValueError(f"{path}: not a loadable checkpoint ({e.__class__.__name__})") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get(key), dict):
        raise ValueError(f"{path}: not a checkpoint written by `medmae {command}`")
    hparams, state = ckpt.get("hyper_parameters"), ckpt.get("state_dict")
    if not isinstance(hparams, dict) or not isinstance(state, dict):
        raise ValueError(f"{path}: checkpoint lacks its hyper_parameters or state_dict")
    net = {k[len("net.") :]: v for k, v in state.items() if isinstance(k, str) and k.startswith("net.")}
    return FinetuneCheckpoint(path, ckpt[key], dict(hparams), net)
