"""Fine-tuning checkpoints read for prediction: safe unpickling, the inference record, the network weights.

A checkpoint written by ``medmae finetune-seg`` / ``finetune-cls`` carries, besides Lightning's own
keys, one record under the task's key (``medmae_segmentation`` / ``medmae_classification``): the
encoder spec, the preprocessing rebuilt from the card, the input normalisation and ``inputs``, the
rule by which fine-tuning read its inputs (the NIfTI modality option; classification also its
plane budget). Prediction rebuilds everything from that record: no export folder, no config.

Checkpoints are untrusted input. Every one is unpickled only with ``torch.load(weights_only=True)``
(:func:`load_safely`; memory-mapped where the format allows), so a planted ``__reduce__`` is refused,
never run, and the refusal is one line. The record is checked by the card's validator
(:func:`medmae.export.card.check_finetune_record`) and the stored tensors are compared with the
network it describes on the meta device before the real one is built
(:func:`medmae.export.card.check_state_shapes`). ``--ckpt_path`` of ``finetune-seg`` / ``finetune-cls``
/ ``fit`` / ``validate`` goes through :func:`check_resume_checkpoint` before Lightning reads the file.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
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


#: ``--ckpt_path`` values Lightning resolves itself (nothing on disk to check beforehand)
CKPT_PATH_KEYWORDS = ("last", "best", "hpc")


def _first_line(e: BaseException) -> str:
    """The informative line of a loading error (torch's weights-only refusal names the blocked global)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    named = [line for line in lines if "global" in line.lower()]
    text = (named or lines or [""])[0]
    return f"{e.__class__.__name__}: {text[:200]}" if text else e.__class__.__name__


def load_safely(path: str | Path) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU, memory-mapped when the file is a zip checkpoint:
    no code in the file can run (a planted ``__reduce__`` is refused).

    Raises:
        ValueError: one line naming the file: missing, or refused / unreadable (with torch's reason).
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: checkpoint not found")
    try:
        try:
            return torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:  # legacy (non-zip) files cannot be memory-mapped
            if "mmap" not in str(e):
                raise
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling / zip / truncation errors differ by torch version
        raise ValueError(f"{path}: not a loadable checkpoint, refused by safe loading ({_first_line(e)})") from None


def check_resume_checkpoint(ckpt_path: object, check: Callable[[dict[str, Any], str], None] | None = None) -> None:
    """The ``--ckpt_path`` pre-check of the LightningCLI commands, run before Lightning reads the file:
    it must load with ``weights_only`` and be a Lightning checkpoint (``state_dict``), and pass
    ``check(checkpoint, path)`` (the command's own checks of what Lightning will take from it). ``None``,
    the keywords Lightning resolves (``last``, ``best``, ``hpc``, ``registry...``) and URLs pass unchecked.

    Raises:
        ValueError: one line naming the file.
    """
    if ckpt_path is None:
        return
    text = str(ckpt_path)
    if text in CKPT_PATH_KEYWORDS or text.startswith("registry") or "://" in text:
        return
    ckpt = load_safely(text)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise ValueError(f"{text}: not a Lightning checkpoint (no 'state_dict')")
    hparams = ckpt.get("hyper_parameters", {})
    if not isinstance(hparams, dict):
        raise ValueError(f"{text}: field 'hyper_parameters' must be a mapping, got {type(hparams).__name__}")
    if check is not None:
        check(ckpt, text)


def precheck_ckpt_path(
    cli: Any, prog: str, check: Callable[[dict[str, Any], str], None] | None = None, *, resolved: bool = False
) -> None:
    """:func:`check_resume_checkpoint` of a LightningCLI's ``--ckpt_path``; a refusal is one line
    ``<prog>: error: ...`` and exit status 2.

    Call it from ``parse_arguments`` (``resolved=False``: before LightningCLI itself loads the file to
    read its hyper-parameters) and again from ``before_fit`` once ``--ckpt_path last`` is resolved
    (``resolved=True``: reads ``config_init``)."""
    if resolved:
        value = cli.config_init[cli.subcommand].get("ckpt_path")
    else:
        sub = cli.config.get("subcommand")
        value = cli.config[sub].get("ckpt_path") if sub else None
    try:
        check_resume_checkpoint(value, check)
    except ValueError as e:  # CardError too
        sys.stderr.write(f"{prog}: error: --ckpt_path {' '.join(str(e).split())}\n")
        raise SystemExit(2) from None


def read_finetune_checkpoint(path: str | Path, key: str, command: str) -> FinetuneCheckpoint:
    """Load ``path`` with ``weights_only`` (no code runs) and check it is a ``command`` checkpoint.

    Raises:
        ValueError: one line naming the file: unloadable, or written by something else.
    """
    path = Path(path)
    ckpt = load_safely(path)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get(key), dict):
        raise ValueError(f"{path}: not a checkpoint written by `medmae {command}`")
    hparams, state = ckpt.get("hyper_parameters"), ckpt.get("state_dict")
    if not isinstance(hparams, dict) or not isinstance(state, dict):
        raise ValueError(f"{path}: checkpoint lacks its hyper_parameters or state_dict")
    net = {k[len("net.") :]: v for k, v in state.items() if isinstance(k, str) and k.startswith("net.")}
    if not net:
        raise ValueError(f"{path}: checkpoint's state_dict holds no network weights ('net.*')")
    return FinetuneCheckpoint(path, ckpt[key], dict(hparams), net)
