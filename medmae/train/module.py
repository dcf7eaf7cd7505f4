"""The LightningModule that pretrains a :class:`~medmae.models.MaskedAutoencoder`.

It owns what the MAE recipe says about optimisation (AdamW (0.9, 0.95), weight decay 0.05 except on
biases / norms / positions / tokens, batch-scaled lr with warmup + half-cycle cosine) and what makes a
long hospital run safe: a non-finite loss never updates weights, decided by all ranks together so DDP
cannot hang, and masks drawn from a per-rank RNG derived from (seed, rank, epoch, batch) so resume and
multi-GPU runs are reproducible without global RNG state.

No host synchronisation inside the step: the non-finite guard is one check of the global gradient
norm per optimizer step (after DDP's all-reduce every rank holds the same gradients, so every rank
decides alike without another collective), handed to fused AdamW as its ``found_inf`` flag, which
skips the update on the device. Counters stay device tensors; the host reads them every
``trainer.log_every_n_steps`` steps.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from functools import partial
from typing import Any, ClassVar

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from torch.optim.lr_scheduler import LambdaLR

from medmae.models import MAEBase, MAEOptions, build_mae, mae_variant
from medmae.train.options import LEGACY_KEYS, OptimOptions, migrate_legacy_hparams
from medmae.train.schedule import lr_at_step, scaled_lr

log = logging.getLogger(__name__)

#: parameter names (suffixes) that never get weight decay, besides every bias and norm weight (ndim <= 1)
NO_DECAY_NAMES = ("pos_embed", "cls_token", "mask_token")


#: the defaults of ``model.mae`` / ``model.optim`` (frozen: one shared instance is safe)
DEFAULT_MAE = MAEOptions()
DEFAULT_OPTIM = OptimOptions()


class MAEPretrainModule(pl.LightningModule):
    """MAE pretraining step, optimiser and schedule, for the 2D (slices) and the 3D (volumes) MAE.

    Args:
        variant: named size, ``mae_vit_{tiny,small,base,large,huge}_patch16`` (2D, a timm ViT) or
            ``mae3d_vit_{tiny,small,base}_patch16`` (3D, for data with ``data.volume``).
        mae: architecture and masking (:class:`~medmae.models.MAEOptions`: ``in_chans``, ``img_size``,
            ``mask_ratio``, ``norm_pix_loss``, encoder and decoder sizes, ``drop_path_rate``); a mapping
            of those fields is accepted too.
        optim: AdamW and the lr schedule (:class:`~medmae.train.options.OptimOptions`: ``blr``, ``lr``,
            ``min_lr``, ``weight_decay``, ``betas``, ``warmup_epochs``, ``warmup_steps``); or a mapping.
        seed: seed of the mask RNG (each rank derives its own stream from it).
        log_images_every_n_steps: reconstruction grid period in optimizer steps (0 = only at the end).
        num_log_images: samples shown in the reconstruction grid.
        compile: ``torch.compile`` the encoder and decoder blocks (static shapes: the visible-token
            count is fixed by ``mask_ratio``); masking and the loss stay eager.
        **legacy: the flat arguments of before issue 19 (``blr=...``, ``mask_ratio=...``: the keys of
            :data:`~medmae.train.options.LEGACY_KEYS`), moved into ``mae`` / ``optim`` with a
            ``DeprecationWarning`` naming the new key.

    ``hparams`` (and a checkpoint's ``hyper_parameters``) hold the plain form: ``variant``, ``mae`` and
    ``optim`` as mappings of every field, ``seed``, ``log_images_every_n_steps``, ``num_log_images``,
    ``compile``.
    """

    #: old flat argument -> new dotted key under ``model`` (:data:`medmae.train.options.LEGACY_KEYS`)
    LEGACY_KEYS: ClassVar[dict[str, str]] = LEGACY_KEYS

    def __init__(
        self,
        variant: str = "mae_vit_base_patch16",
        mae: MAEOptions = DEFAULT_MAE,
        optim: OptimOptions = DEFAULT_OPTIM,
        seed: int = 0,
        log_images_every_n_steps: int = 500,
        num_log_images: int = 4,
        compile: bool = False,
        **legacy: Any,
    ) -> None:
        super().__init__()
        if legacy:
            unknown = sorted(set(legacy) - set(LEGACY_KEYS))
            if unknown:
                raise TypeError(f"MAEPretrainModule got an unexpected keyword argument {unknown[0]!r}")
            moved = migrate_legacy_hparams({"mae": mae, "optim": optim, **legacy}, warn=_deprecated)
            mae, optim = moved["mae"], moved["optim"]
        #: architecture and masking (``model.mae``) and optimiser (``model.optim``), checked
        self.mae_options = MAEOptions.of(mae)
        self.optim_options = OptimOptions.of(optim)
        self.save_hyperparameters(
            {
                "variant": variant,
                "mae": self.mae_options.to_dict(),
                "optim": self.optim_options.to_dict(),
                "seed": seed,
                "log_images_every_n_steps": log_images_every_n_steps,
                "num_log_images": num_log_images,
                "compile": compile,
            }
        )
        self.model: MAEBase = _build_model(variant, self.mae_options)
        self._skipped = torch.zeros(())  # device tensor: optimizer steps skipped for non-finite gradients
        self._skipped_seen = 0  # what the host last read (for the warning)
        self.data_replacements: dict[str, torch.Tensor] = {}
        self._compiled = False
        self._mask_generator: torch.Generator | None = None
        self.effective_batch_size: int | None = None

    @classmethod
    def from_hparams(cls, hparams: dict[str, Any]) -> MAEPretrainModule:
        """The module a checkpoint's ``hyper_parameters`` describe, old flat ones (mapped through
        :data:`~medmae.train.options.LEGACY_KEYS`, silently) or new; private ``_`` keys (LightningCLI's
        ``_instantiator``) are left out."""
        plain = {k: v for k, v in hparams.items() if not str(k).startswith("_")}
        return cls(**migrate_legacy_hparams(plain))

    @classmethod
    def load_from_checkpoint(cls, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        """Lightning's ``load_from_checkpoint``, also for checkpoints with flat (pre-options) hyper-parameters.

        Those written by ``medmae fit`` name LightningCLI's instantiator, which would parse the flat keys
        against today's signature and refuse them; the module is built through ``__init__`` instead,
        which maps them (:data:`~medmae.train.options.LEGACY_KEYS`)."""
        kwargs.setdefault("_instantiator", None)
        return super().load_from_checkpoint(*args, **kwargs)

    # ------------------------------------------------------------------ data checks

    def check_data_compatible(self, datamodule: Any) -> None:
        """Stop before training when the data cannot feed this model; the message names the fields."""
        dims = getattr(datamodule, "spatial_dims", None)
        if dims is not None and dims != self.spatial_dims:
            raise ValueError(
                f"model.variant={self.hparams.variant} is a {self.spatial_dims}D MAE but the data yields "
                f"{dims}D samples: "
                + (
                    "set data.volume (3D crops) or a 2D variant (mae_vit_*)"
                    if self.spatial_dims == 3
                    else "use a 3D variant (mae3d_vit_*) with data.volume, or remove data.volume"
                )
            )
        channels = getattr(datamodule, "channels", None)
        if channels is not None and channels != self.model.in_chans:
            raise ValueError(
                f"model.mae.in_chans={self.model.in_chans} but the data yields {channels} channel(s) per image "
                f"(data.slices / windows-as-channels); set model.mae.in_chans: {channels}"
            )
        size = getattr(datamodule, "image_size", None)
        if size is not None and tuple(size) != tuple(self.model.img_size):
            field = "data.volume.size" if self.spatial_dims == 3 else "data.img_size"
            raise ValueError(
                f"model.mae.img_size={list(self.model.img_size)} but {field}={list(size)}; they must match"
            )

    @property
    def spatial_dims(self) -> int:
        """2 for the slice MAE, 3 for the volume MAE."""
        return mae_variant(self.hparams.variant).spatial_dims

    def setup(self, stage: str) -> None:
        if self.trainer is not None and self.trainer.datamodule is not None:
            self.check_data_compatible(self.trainer.datamodule)
        if self.hparams.get("compile", False) and not self._compiled:
            # here, not in __init__: each (spawned) process compiles its own copy after pickling
            self.model.compile_blocks()
            self._compiled = True

    # ------------------------------------------------------------------ steps

    def mask_generator(self, stream: tuple[int, ...]) -> torch.Generator:
        """A generator on this module's device, seeded from (seed, rank, *stream).

        Stateless by construction: the same (epoch, batch) on the same rank always draws the same
        masks, so a resumed run continues exactly and no RNG state must be checkpointed per rank.
        """
        if self._mask_generator is None or self._mask_generator.device != self.device:
            self._mask_generator = torch.Generator(device=self.device)
        rank = self.global_rank if self._trainer is not None else 0
        return self._mask_generator.manual_seed(mask_seed(self.hparams.seed, rank, *stream))

    def train_mask_stream(self, batch: Any, batch_idx: int) -> tuple[int, int, int]:
        """``(0, epoch, batch number)`` of a training batch, the stream its masks are drawn from.

        A :class:`~medmae.data.CacheDataModule` batch carries ``step_key`` = (epoch, batch number)
        read from its own sampler keys, so the data and the masks share one position and a resumed run
        draws the very masks of the uninterrupted one. Other data fall back to Lightning's
        ``(current_epoch, batch_idx)``.
        """
        key = batch.get("step_key") if isinstance(batch, dict) else None
        if key is not None:
            epoch, number = key
            return 0, int(epoch), int(number)
        return 0, self.current_epoch, batch_idx

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        imgs = batch["image"]
        out = self.model(imgs, generator=self.mask_generator(self.train_mask_stream(batch, batch_idx)))
        self.log("train/loss", out.loss.detach(), on_step=True, prog_bar=True, batch_size=imgs.shape[0])
        self._count_data_replacements(batch)
        return out.loss

    def _count_data_replacements(self, batch: dict[str, torch.Tensor]) -> None:
        """Log how many samples the loader replaced (unreadable cache entry / background crop) so far.

        The running counts stay on the batch's device: no host sync in the training step.
        """
        for key, tag in (("skipped", "data/unreadable_entry_skips"), ("rejected", "data/background_rejects")):
            if key in batch:
                total = self.data_replacements.get(key, 0) + batch[key].sum().float()
                self.data_replacements[key] = total
                self.log(tag, total, on_step=True)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        imgs = batch["image"]
        out = self.model(imgs, generator=self.mask_generator((1, batch_idx)))
        self.log("val/loss", out.loss, on_epoch=True, sync_dist=True, batch_size=imgs.shape[0])
        return out.loss

    # ------------------------------------------------------------------ non-finite guard

    @property
    def skipped_steps(self) -> int:
        """Optimizer steps skipped so far because a gradient was non-finite (reads the device counter)."""
        return int(self._skipped.item())

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Skip the update of a poisoned accumulation window on every rank, without a host sync.

        A non-finite loss on any rank makes the all-reduced gradients non-finite on every rank, and a
        finite loss can still give non-finite gradients: both show in the global gradient norm.
        Fused AdamW takes the flag as ``found_inf`` and leaves weights, moments and step count as they
        are; other optimizers (foreach under a GradScaler) read it once per step and drop the grads.
        """
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        if grads:
            norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)).float())
        else:
            norm = torch.zeros((), device=self.device)
        found = (~torch.isfinite(norm)).float()
        if self._skipped.device != found.device:
            self._skipped = self._skipped.to(found.device)
        self._skipped = self._skipped + found
        if optimizer.defaults.get("fused"):
            optimizer.found_inf = found
        elif bool(found.item()):  # not fused: one sync per optimizer step, never per micro-batch
            for group in optimizer.param_groups:
                for p in group["params"]:
                    p.grad = None
        self.log("train/grad_norm", norm, on_step=True)
        self.log("train/skipped_steps", self._skipped, on_step=True)
        self.log("train/lr", optimizer.param_groups[0]["lr"], on_step=True)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Every ``log_every_n_steps`` steps the host reads the skip counter once and warns on news."""
        trainer = self.trainer
        if trainer.global_step % max(1, trainer.log_every_n_steps):
            return
        self._warn_on_new_skips()

    def on_train_end(self) -> None:
        self._warn_on_new_skips()

    def _warn_on_new_skips(self) -> None:
        skipped = self.skipped_steps
        if skipped > self._skipped_seen:
            log.warning(
                "non-finite gradients: %d optimizer step(s) skipped on all ranks (%d in total, by step %d)",
                skipped - self._skipped_seen,
                skipped,
                self.global_step,
            )
            self._skipped_seen = skipped

    # ------------------------------------------------------------------ optimisation

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.optim_options
        self.effective_batch_size = self._effective_batch_size()
        base_lr = hp.lr if hp.lr is not None else scaled_lr(hp.blr, self.effective_batch_size)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = min(total, self._warmup_steps(total))
        min_lr = min(hp.min_lr, base_lr)
        log.info(
            "lr %.3g (effective batch %d), warmup %d of %d steps", base_lr, self.effective_batch_size, warmup, total
        )
        groups = weight_decay_groups(self.model.named_parameters(), hp.weight_decay)
        opt = torch.optim.AdamW(groups, lr=base_lr, betas=tuple(hp.betas), **self._adamw_impl())
        rule = partial(_lr_factor, base_lr=base_lr, min_lr=min_lr, warmup=warmup, total=total)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": LambdaLR(opt, rule), "interval": "step"}}

    def _effective_batch_size(self) -> int:
        dm = self.trainer.datamodule
        batch = getattr(dm, "batch_size", None)
        if not isinstance(batch, int):
            if self.optim_options.lr is None:
                raise ValueError("cannot scale the lr: the datamodule has no integer batch_size; set model.optim.lr")
            return 1
        return batch * self.trainer.world_size * self.trainer.accumulate_grad_batches

    def _warmup_steps(self, total: int) -> int:
        if self.optim_options.warmup_steps is not None:
            return int(self.optim_options.warmup_steps)
        batches = self.trainer.num_training_batches
        if not isinstance(batches, int) or batches <= 0:  # infinite loader: epochs are undefined
            return 0
        per_epoch = max(1, -(-batches // self.trainer.accumulate_grad_batches))
        return int(round(self.optim_options.warmup_epochs * per_epoch))

    def _adamw_impl(self) -> dict[str, bool]:
        """Fused AdamW is fastest (one kernel, also on CPU) but cannot run under a GradScaler's unscale."""
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        return {"fused": True} if scaler is None else {"foreach": True}

    # ------------------------------------------------------------------ checkpoint

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep what export needs besides weights: encoder config and the data preprocessing record."""
        dm = self.trainer.datamodule if self._trainer is not None else None
        preprocessing = dm.preprocessing() if hasattr(dm, "preprocessing") else None
        checkpoint["medmae"] = {
            "skipped_steps": self.skipped_steps,  # one host read per checkpoint
            "encoder": self.model.encoder_config(),
            "preprocessing": preprocessing,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._skipped = torch.tensor(float(checkpoint.get("medmae", {}).get("skipped_steps", 0)))
        self._skipped_seen = int(self._skipped.item())

    def configure_callbacks(self) -> list[Callback]:
        from medmae.train.callbacks import ReconstructionLogger, ThroughputLogger
        from medmae.train.checkpoint_io import AtomicCheckpoints

        return [
            AtomicCheckpoints(),
            ThroughputLogger(),
            ReconstructionLogger(self.hparams.log_images_every_n_steps, self.hparams.num_log_images),
        ]


def _build_model(variant: str, options: MAEOptions) -> MAEBase:
    """The MAE ``model.variant`` names, 2D (timm ViT) or 3D (``mae3d_*``); ValueError naming the field."""
    try:
        mae_variant(variant, field="model.variant")
    except ValueError as err:
        raise ValueError(f"{err} (with data.volume)") from None
    return build_mae(variant, options)


def _deprecated(message: str) -> None:
    warnings.warn(message, DeprecationWarning, stacklevel=4)


def mask_seed(seed: int, rank: int, *stream: int) -> int:
    """A 63-bit seed that differs for every (seed, rank, stream) — e.g. stream = (epoch, batch)."""
    state = np.random.SeedSequence([seed, rank, *stream]).generate_state(2, dtype=np.uint32)
    return int(state[0]) << 31 | int(state[1]) >> 1


def _lr_factor(step: int, base_lr: float, min_lr: float, warmup: int, total: int) -> float:
    return lr_at_step(step, base_lr, min_lr, warmup, total) / base_lr


def weight_decay_groups(
    named_params: Iterator[tuple[str, torch.nn.Parameter]], weight_decay: float
) -> list[dict[str, Any]]:
    """Two AdamW groups: decay for weight matrices, none for biases, norms, positions and tokens."""
    decay, no_decay = [], []
    for name, p in named_params:
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or name.endswith(NO_DECAY_NAMES):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
