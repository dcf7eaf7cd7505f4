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
from collections.abc import Iterator
from functools import partial
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from torch.optim.lr_scheduler import LambdaLR

from medmae.models import MAEBase, as_hw, mae_variant
from medmae.train.schedule import lr_at_step, scaled_lr

log = logging.getLogger(__name__)

#: parameter names (suffixes) that never get weight decay, besides every bias and norm weight (ndim <= 1)
NO_DECAY_NAMES = ("pos_embed", "cls_token", "mask_token")


class MAEPretrainModule(pl.LightningModule):
    """MAE pretraining step, optimiser and schedule, for the 2D (slices) and the 3D (volumes) MAE.

    Args:
        variant: named size, ``mae_vit_{tiny,small,base,large,huge}_patch16`` (2D, a timm ViT) or
            ``mae3d_vit_{tiny,small,base}_patch16`` (3D, for data with ``data.volume``).
        in_chans: input channels (1 grayscale; k for 2.5D); must equal the data's channels.
        img_size: 2D ``H`` or ``[H, W]``; 3D ``S`` or ``[Z, Y, X]``; must equal the data's sample
            size (``data.img_size`` / ``data.volume.size``); multiples of the patch size.
        mask_ratio: fraction of patches masked per sample.
        norm_pix_loss: regress per-patch normalised pixels.
        embed_dim, depth, num_heads, mlp_ratio, patch_size: encoder size overrides (None = variant's).
        drop_path_rate: stochastic depth in the encoder.
        decoder_embed_dim, decoder_depth, decoder_num_heads, decoder_mlp_ratio: decoder size.
        blr: base lr; the actual lr is ``blr * effective_batch / 256``.
        lr: absolute lr; overrides ``blr`` when set.
        min_lr: lr at the end of the cosine.
        weight_decay: AdamW weight decay (not applied to biases, norms, positions, tokens).
        betas: AdamW betas.
        warmup_epochs: linear warmup length in epochs (converted to optimizer steps).
        warmup_steps: warmup length in optimizer steps; overrides ``warmup_epochs`` when set.
        seed: seed of the mask RNG (each rank derives its own stream from it).
        log_images_every_n_steps: reconstruction grid period in optimizer steps (0 = only at the end).
        num_log_images: samples shown in the reconstruction grid.
        compile: ``torch.compile`` the encoder and decoder blocks (static shapes: the visible-token
            count is fixed by ``mask_ratio``); masking and the loss stay eager.
    """

    def __init__(
        self,
        variant: str = "mae_vit_base_patch16",
        in_chans: int = 1,
        img_size: int | tuple[int, int] | tuple[int, int, int] = 224,
        mask_ratio: float = 0.75,
        norm_pix_loss: bool = True,
        embed_dim: int | None = None,
        depth: int | None = None,
        num_heads: int | None = None,
        mlp_ratio: float | None = None,
        patch_size: int | None = None,
        drop_path_rate: float = 0.0,
        decoder_embed_dim: int = 512,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        decoder_mlp_ratio: float = 4.0,
        blr: float = 1.5e-4,
        lr: float | None = None,
        min_lr: float = 0.0,
        weight_decay: float = 0.05,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_epochs: float = 40.0,
        warmup_steps: int | None = None,
        seed: int = 0,
        log_images_every_n_steps: int = 500,
        num_log_images: int = 4,
        compile: bool = False,
    ) -> None:
        super().__init__()
        _check_optim_args(blr, lr, min_lr, weight_decay, betas, warmup_epochs, warmup_steps)
        self.save_hyperparameters()
        self.model: MAEBase = build_mae(self.hparams)
        self._skipped = torch.zeros(())  # device tensor: optimizer steps skipped for non-finite gradients
        self._skipped_seen = 0  # what the host last read (for the warning)
        self.data_replacements: dict[str, torch.Tensor] = {}
        self._compiled = False
        self._mask_generator: torch.Generator | None = None
        self.effective_batch_size: int | None = None

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
                f"model.in_chans={self.model.in_chans} but the data yields {channels} channel(s) per image "
                f"(data.slices / windows-as-channels); set model.in_chans: {channels}"
            )
        size = getattr(datamodule, "image_size", None)
        if size is not None and tuple(size) != tuple(self.model.img_size):
            field = "data.volume.size" if self.spatial_dims == 3 else "data.img_size"
            raise ValueError(f"model.img_size={list(self.model.img_size)} but {field}={list(size)}; they must match")

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
        hp = self.hparams
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
            if self.hparams.lr is None:
                raise ValueError("cannot scale the lr: the datamodule has no integer batch_size; set model.lr")
            return 1
        return batch * self.trainer.world_size * self.trainer.accumulate_grad_batches

    def _warmup_steps(self, total: int) -> int:
        if self.hparams.warmup_steps is not None:
            return int(self.hparams.warmup_steps)
        batches = self.trainer.num_training_batches
        if not isinstance(batches, int) or batches <= 0:  # infinite loader: epochs are undefined
            return 0
        per_epoch = max(1, -(-batches // self.trainer.accumulate_grad_batches))
        return int(round(self.hparams.warmup_epochs * per_epoch))

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


def build_mae(hp: Any) -> MAEBase:
    """The MAE the hyperparameters name: 2D (timm ViT) or 3D (``mae3d_*``); ValueError naming the field."""
    common = {
        "in_chans": hp.in_chans,
        "mask_ratio": hp.mask_ratio,
        "norm_pix_loss": hp.norm_pix_loss,
        "embed_dim": hp.embed_dim,
        "depth": hp.depth,
        "num_heads": hp.num_heads,
        "patch_size": hp.patch_size,
        "drop_path_rate": hp.drop_path_rate,
        "decoder_embed_dim": hp.decoder_embed_dim,
        "decoder_depth": hp.decoder_depth,
        "decoder_num_heads": hp.decoder_num_heads,
        "decoder_mlp_ratio": hp.decoder_mlp_ratio,
    }
    try:
        variant = mae_variant(hp.variant, field="model.variant")
    except ValueError as err:
        raise ValueError(f"{err} (with data.volume)") from None
    if variant.spatial_dims == 3:
        size = hp.img_size
        if not isinstance(size, int) and (isinstance(size, str) or len(size) != 3):
            raise ValueError(f"model.img_size must be S or [Z, Y, X] for the 3D variant {hp.variant}, got {size!r}")
        return variant.create(img_size=size, mlp_ratio=hp.mlp_ratio if hp.mlp_ratio is not None else 4.0, **common)
    return variant.create(img_size=as_hw(hp.img_size), mlp_ratio=hp.mlp_ratio, **common)


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


def _check_optim_args(
    blr: float,
    lr: float | None,
    min_lr: float,
    weight_decay: float,
    betas: tuple[float, float],
    warmup_epochs: float,
    warmup_steps: int | None,
) -> None:
    checks = [
        ("blr", blr, blr > 0),
        ("lr", lr, lr is None or lr > 0),
        ("min_lr", min_lr, min_lr >= 0),
        ("weight_decay", weight_decay, weight_decay >= 0),
        ("betas", betas, len(betas) == 2 and all(0 <= b < 1 for b in betas)),
        ("warmup_epochs", warmup_epochs, warmup_epochs >= 0),
        ("warmup_steps", warmup_steps, warmup_steps is None or warmup_steps >= 0),
    ]
    for name, value, ok in checks:
        if not ok:
            raise ValueError(f"model.{name} has an invalid value: {value!r}")
