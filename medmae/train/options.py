"""Options of the pretraining module, one validated frozen dataclass per concern.

``model.mae`` is :class:`~medmae.models.MAEOptions` (architecture and masking: what the model builders
take), ``model.optim`` is :class:`OptimOptions` (AdamW and the lr schedule); ``variant``, ``seed``, the
image logging and ``compile`` stay flat::

    model:
      variant: mae_vit_tiny_patch16
      mae: {in_chans: 1, img_size: [64, 64], patch_size: 8, depth: 4, mask_ratio: 0.75}
      optim: {blr: 1.0e-2, warmup_steps: 20, min_lr: 1.0e-5}
      seed: 0

Before issue 19 every one of these was a flat ``model`` argument (``model.blr``, ``--model.mask_ratio``),
and checkpoints written then keep them flat in ``hyper_parameters``. :data:`LEGACY_KEYS` is the one
table from an old flat name to its new dotted place under ``model``; :func:`migrate_legacy_hparams`
applies it (the CLI, ``MAEPretrainModule(**old_kwargs)`` and the exporter all go through it).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from medmae.data.options import migrate_legacy
from medmae.models.options import MAEOptions

__all__ = ["LEGACY_KEYS", "MAEOptions", "OptimOptions", "migrate_legacy_hparams"]

#: how errors name an :class:`OptimOptions` field (its place in the pretraining config)
OPTIM_PREFIX = "model.optim"


@dataclass(frozen=True)
class OptimOptions:
    """AdamW and the lr schedule of MAE pretraining (the MAE recipe's defaults).

    Args:
        blr: base lr; the actual lr is ``blr * effective_batch / 256``.
        lr: absolute lr; overrides ``blr`` when set.
        min_lr: lr at the end of the half-cycle cosine.
        weight_decay: AdamW weight decay (not applied to biases, norms, positions, tokens).
        betas: AdamW betas, each in [0, 1).
        warmup_epochs: linear warmup length in epochs (converted to optimizer steps).
        warmup_steps: warmup length in optimizer steps; overrides ``warmup_epochs`` when set.
    """

    blr: float = 1.5e-4
    lr: float | None = None
    min_lr: float = 0.0
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_epochs: float = 40.0
    warmup_steps: int | None = None

    def __post_init__(self) -> None:
        if not _is_number(self.blr) or not self.blr > 0:
            _fail("blr", "a number > 0", self.blr)
        if self.lr is not None and (not _is_number(self.lr) or not self.lr > 0):
            _fail("lr", "null or a number > 0", self.lr)
        if not _is_number(self.min_lr) or not self.min_lr >= 0:
            _fail("min_lr", "a number >= 0", self.min_lr)
        if not _is_number(self.weight_decay) or not self.weight_decay >= 0:
            _fail("weight_decay", "a number >= 0", self.weight_decay)
        betas = self.betas
        if (
            not isinstance(betas, list | tuple)
            or len(betas) != 2
            or not all(_is_number(b) and 0 <= b < 1 for b in betas)
        ):
            _fail("betas", "two numbers in [0, 1)", betas)
        object.__setattr__(self, "betas", tuple(betas))
        if not _is_number(self.warmup_epochs) or not self.warmup_epochs >= 0:
            _fail("warmup_epochs", "a number >= 0", self.warmup_epochs)
        steps = self.warmup_steps
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 0):
            _fail("warmup_steps", "null or an int >= 0", steps)

    @classmethod
    def of(cls, value: OptimOptions | Mapping[str, Any] | None = None, **overrides: Any) -> OptimOptions:
        """``value`` (options, a mapping of fields, or None: defaults) with ``overrides``."""
        if value is None:
            value = cls()
        elif isinstance(value, Mapping):
            value = cls(**_known(dict(value)))
        elif not isinstance(value, cls):
            raise ValueError(f"{OPTIM_PREFIX} must be a mapping of optimiser options, got {type(value).__name__}")
        return replace(value, **_known(overrides)) if overrides else value

    def to_dict(self) -> dict[str, Any]:
        """Plain fields (a list for ``betas``): what a checkpoint and a YAML config hold."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


#: old flat ``model`` argument -> its new dotted key under ``model`` (issue 19). The CLI moves these keys
#: in YAML, ``--model.<old>`` arguments and checkpoint hyper-parameters; ``MAEPretrainModule`` and the
#: exporter map old keyword arguments / hyper-parameters with it.
LEGACY_KEYS: dict[str, str] = {
    **{f.name: f"mae.{f.name}" for f in fields(MAEOptions)},
    **{f.name: f"optim.{f.name}" for f in fields(OptimOptions)},
}


def migrate_legacy_hparams(
    hparams: Mapping[str, Any], warn: Callable[[str], None] | None = None, prefix: str = "model"
) -> dict[str, Any]:
    """``hparams`` (``MAEPretrainModule`` arguments or a checkpoint's ``hyper_parameters``) with every old
    flat key of :data:`LEGACY_KEYS` moved into its section (``mae`` / ``optim``); ``warn("model.<old> is
    deprecated: use model.<new>")`` once per moved key.

    A section given as a mapping takes the old keys beside its own (a key given both ways is a
    ``ValueError``: which one was meant is unknown); one given as an options object (Python callers) is
    overridden field by field. The one migration rule of every section: :func:`medmae.data.options.migrate_legacy`."""
    return migrate_legacy(hparams, LEGACY_KEYS, prefix, warn if warn is not None else _silent)


def _silent(message: str) -> None:
    """Checkpoint hyper-parameters are migrated without a word: the user wrote no old key."""


def _known(kwargs: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in fields(OptimOptions)}
    unknown = sorted(set(kwargs) - names)
    if unknown:
        raise ValueError(f"{OPTIM_PREFIX}.{unknown[0]} is not an option; choose from {sorted(names)}")
    return kwargs


def _is_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | float)


def _fail(name: str, what: str, value: Any) -> None:
    raise ValueError(f"{OPTIM_PREFIX}.{name} must be {what}, got {value!r}")
