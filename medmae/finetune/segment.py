"""Segmentation fine-tuning: a MONAI UNETR (2D) around the exported encoder, DiceCE, layer-wise lr decay.

Why UNETR: it is the decoder MONAI users already run, it takes the ViT's hidden states at four depths
and adds a full-resolution convolutional skip from the input, which is what dense prediction from MAE
features needs (DESIGN.md section 8: the MAE loss does not keep visible patches' detail). MONAI's UNETR
fixes 16-pixel patches and reads blocks 3, 6 and 9, so the encoder must be a patch-16 ViT with at
least 10 blocks (``build_unetr`` says so by field name otherwise).

Validation scores whole volumes: every plane is predicted on the encoder grid, resampled back to its
plane (undoing pad + resize), and the planes are stacked into the volume before per-class Dice is
computed against the original labels. ``val/dice`` is the mean over foreground classes.

A 3D export (``arch: medmae_vit3d``) switches the same module to MONAI ``UNETR(spatial_dims=3)``,
random 3D patches and sliding-window validation over whole volumes (:mod:`medmae.finetune.segment3d`,
:mod:`medmae.finetune.seg_data3d`); loss, layer-wise lr decay and schedule are shared.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from monai.losses import DiceCELoss
from torch import nn

from medmae.finetune.checkpoints import read_finetune_checkpoint
from medmae.finetune.dims import dims_for
from medmae.finetune.encoders import (
    EncoderSource,
    InputNorm,
    Preprocessor,
    build_network,
    parse_init,
    resolve_encoder,
)
from medmae.finetune.gather import Key, gather_unique, val_case_key
from medmae.finetune.layer_decay import drop_untrained, layer_decay_groups
from medmae.finetune.samples import EpochHook
from medmae.finetune.schedule import adamw_warmup_cosine
from medmae.finetune.seg_data2d import PreparedCase
from medmae.finetune.seg_data3d import PreparedVolume
from medmae.finetune.segment2d import predict_planes as predict_planes  # re-exported (the 2D half's)
from medmae.finetune.volumes import inputs_record, recorded_modality

log = logging.getLogger(__name__)

#: key under which a fine-tuning checkpoint keeps what inference needs besides weights
CKPT_KEY = "medmae_segmentation"


DECODERS = ("unetr", "light")
#: where the encoder's parameters sit inside ``Segmenter`` per decoder (for layer-wise lr decay)
ENCODER_PREFIX = {"unetr": "model.vit.", "light": "model.encoder."}


class Segmenter(nn.Module):
    """Input normalisation (identity for medmae encoders) followed by the segmentation network."""

    def __init__(self, model: nn.Module, input_norm: InputNorm | None) -> None:
        super().__init__()
        self.input_norm = input_norm if input_norm is not None else nn.Identity()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self.input_norm(x))


def build_segmenter(
    source: EncoderSource,
    num_classes: int,
    feature_size: int = 16,
    cls_token: bool = True,
    dropout_rate: float = 0.0,
    decoder: str = "unetr",
    tap_norm: bool = True,
) -> Segmenter:
    """The fine-tuning network for an encoder source (weights loaded when the source has them).

    ``unetr``: MONAI UNETR (patch 16, >= 10 blocks); ``light``: the same design over the timm encoder
    for any power-of-two patch and depth (:mod:`medmae.finetune.light_decoder`). A 3D source gets
    MONAI UNETR 3D or the light decoder in 3D (:func:`~medmae.finetune.segment3d.build_segmenter3d`;
    ``cls_token`` is the encoder's).
    """
    if decoder not in DECODERS:
        raise ValueError(f"model.decoder must be one of {DECODERS}, got {decoder!r}")

    dims = dims_for(source.preprocessing)

    def build(s: EncoderSource) -> nn.Module:
        return dims.build_network(s, num_classes, feature_size, cls_token, dropout_rate, decoder, tap_norm)

    return Segmenter(build_network(source, build), source.input_norm)


def _class_counts(pred: np.ndarray, target: np.ndarray, num_classes: int) -> list[tuple[int, int, int]]:
    """Per foreground class: ``(voxels predicted and truly that class, voxels predicted, voxels in the truth)``."""
    pred, target = np.asarray(pred), np.asarray(target)
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from label shape {target.shape}")
    out = []
    for k in range(1, num_classes):
        p, t = pred == k, target == k
        out.append((int(np.count_nonzero(p & t)), int(np.count_nonzero(p)), int(np.count_nonzero(t))))
    return out


def _dice(counts: list[tuple[int, int, int]], ignore_empty: bool) -> list[float]:
    out = []
    for both, n_pred, n_truth in counts:
        if n_truth > 0:
            out.append(2.0 * both / (n_pred + n_truth))
        elif ignore_empty:
            out.append(math.nan)
        else:
            out.append(1.0 if n_pred == 0 else 0.0)
    return out


def dice_per_class(pred: np.ndarray, target: np.ndarray, num_classes: int, ignore_empty: bool = True) -> list[float]:
    """Dice of classes ``1..K-1`` on one whole volume, with MONAI ``DiceMetric`` semantics.

    ``2 |P & T| / (|P| + |T|)`` per class (``include_background=False``). A class absent from the
    truth is NaN (``ignore_empty=True``, MONAI's default: left out of every mean) whatever was
    predicted; a class in the truth but not predicted is 0. ``ignore_empty=False`` is MONAI's other
    mode: a class absent from the truth scores 1 when also absent from the prediction, else 0.
    Equal to ``monai.metrics.compute_dice`` on the one-hot volumes (tested), in float64.
    """
    return _dice(_class_counts(pred, target, num_classes), ignore_empty)


def mean_dice(rows: Sequence[Sequence[float]]) -> tuple[list[float], float]:
    """``(per-class Dice, mean Dice)`` of per-volume rows from :func:`dice_per_class`.

    A class's Dice is its mean over the volumes whose truth holds it (NaN entries skipped: MONAI
    ``DiceMetric(reduction="mean_batch")``); a class no volume holds is NaN and left out of the mean
    over classes. If no volume holds any foreground class the mean is 0.0 (as MONAI's reductions give
    for all-NaN input), never NaN.
    """
    if not rows:
        return [], 0.0
    a = np.asarray(rows, dtype=np.float64).reshape(len(rows), -1)
    present = ~np.isnan(a)
    counts = present.sum(axis=0)
    sums = np.where(present, a, 0.0).sum(axis=0)
    per_class = np.full(a.shape[1], np.nan)
    np.divide(sums, counts, out=per_class, where=counts > 0)
    defined = per_class[counts > 0]
    return per_class.tolist(), float(defined.mean()) if defined.size else 0.0


def predict_case(
    net: nn.Module, case: PreparedCase | PreparedVolume, pre: Preprocessor, batch: int = 16, overlap: float = 0.25
) -> tuple[np.ndarray, np.ndarray]:
    """``(prediction, labels)`` of a validation case on its original grid: planes (2D) or sliding windows (3D)."""
    return dims_for(pre).predict_case(net, case, pre, batch, overlap)  # type: ignore[arg-type]


class SegmentationModule(EpochHook):
    """Fine-tune a UNETR from ``init`` (``medmae:DIR`` | ``random:DIR`` | ``timm:NAME``).

    Args:
        init: where the encoder comes from (see :mod:`medmae.finetune.encoders`).
        num_classes: classes including background.
        card: export folder for architecture/preprocessing when ``init`` is plain ``random``.
        lr: peak learning rate (AdamW) of the decoder and the top encoder layer.
        min_lr: lr at the end of the cosine.
        layer_decay: lr factor per encoder layer going down (1 = none).
        weight_decay: AdamW weight decay (not on biases, norms, positions, tokens).
        warmup_steps: linear warmup in optimizer steps.
        encoder_hold_steps: decoder-first steps (LP-FT): the encoder's embeddings and blocks stay at lr 0
            while the new decoder learns on the features as they are, then get their own warmup + cosine.
        decoder: ``unetr`` (MONAI UNETR: patch 16, >= 10 blocks) or ``light`` (UNETR's design over the
            timm encoder: any power-of-two patch, any depth).
        feature_size: decoder width at full resolution.
        tap_norm: ``light`` decoder only: LayerNorm on each tapped block output (see light_decoder.py).
        cls_token: keep the pretrained class token in the encoder (2D; a 3D encoder keeps its own).
        dropout_rate: dropout inside the ViT blocks.
        dice_weight, ce_weight: weights of the Dice and cross-entropy terms of ``DiceCELoss``.
        infer_batch: planes (2D) or sliding windows (3D) per forward pass in validation.
        sw_overlap: 3D only: overlap of neighbouring sliding windows (MONAI ``sliding_window_inference``).
    """

    def __init__(
        self,
        init: str,
        num_classes: int,
        card: str | None = None,
        lr: float = 1e-3,
        min_lr: float = 1e-6,
        layer_decay: float = 0.75,
        weight_decay: float = 0.05,
        warmup_steps: int = 50,
        encoder_hold_steps: int = 0,
        decoder: str = "unetr",
        feature_size: int = 16,
        tap_norm: bool = True,
        cls_token: bool = True,
        dropout_rate: float = 0.0,
        dice_weight: float = 1.0,
        ce_weight: float = 1.0,
        infer_batch: int = 16,
        sw_overlap: float = 0.25,
    ) -> None:
        super().__init__()
        for name, value in (("lr", lr), ("min_lr", min_lr + 1e-30), ("weight_decay", weight_decay + 1e-30)):
            if not value > 0:
                raise ValueError(f"model.{name} must be > 0, got {value!r}")
        if not 0.0 < layer_decay <= 1.0:
            raise ValueError(f"model.layer_decay must be in (0, 1], got {layer_decay!r}")
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"model.num_classes must be an int >= 2, got {num_classes!r}")
        if not 0.0 <= sw_overlap < 1.0:
            raise ValueError(f"model.sw_overlap must be in [0, 1), got {sw_overlap!r}")
        self.save_hyperparameters()
        source = resolve_encoder(parse_init(init, card))
        self.source_record = source.record()
        self.preprocessing = source.preprocessing
        self.dims = dims_for(source.preprocessing)  # planes (2D) or volumes (3D), chosen once by the card
        self.net = build_segmenter(source, num_classes, feature_size, cls_token, dropout_rate, decoder, tap_norm)
        self.depth = len(self.net.get_submodule(ENCODER_PREFIX[decoder] + "blocks"))
        self.loss = DiceCELoss(to_onehot_y=True, softmax=True, lambda_dice=dice_weight, lambda_ce=ce_weight)
        self._val_dice: list[tuple[Key, tuple[list[float], list[float]]]] = []  # (key, (MONAI, empty=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.loss(self.net(batch["image"]), batch["label"])
        self.log("train/loss", loss, on_step=True, prog_bar=True, batch_size=batch["image"].shape[0])
        return loss

    def validation_step(self, case: PreparedCase | PreparedVolume, batch_idx: int) -> None:
        hp = self.hparams
        pred, truth = self.dims.predict_case(self.net, case, self.preprocessing, hp.infer_batch, hp.sw_overlap)
        counts = _class_counts(pred, truth, hp.num_classes)
        # (case key, MONAI Dice, empty-inclusive Dice): the key lets the epoch end drop DDP repeats
        self._val_dice.append((val_case_key(self.trainer, batch_idx), (_dice(counts, True), _dice(counts, False))))

    def on_validation_epoch_end(self) -> None:
        """``val/dice`` (MONAI semantics, see :func:`mean_dice`) over every rank's cases, each once.

        Also ``val/dice_class{k}`` (classes some volume holds) and ``val/dice_empty1``, the mean with a
        class absent from truth and prediction counted 1 (what ``val/dice`` was before MONAI semantics).
        """
        rows = gather_unique(self._val_dice)  # a collective under DDP: every rank runs it
        self._val_dice = []
        if not rows:
            return
        per_class, mean = mean_dice([r for r, _ in rows])
        for k, d in enumerate(per_class, start=1):
            if not math.isnan(d):
                self.log(f"val/dice_class{k}", d)
        missing = [k for k, d in enumerate(per_class, start=1) if math.isnan(d)]
        if missing:
            none_left = "; val/dice is 0: no class to score" if len(missing) == len(per_class) else ""
            rank_zero_warn(
                f"validation: class(es) {missing} have no voxel in any of the {len(rows)} validation volumes; "
                f"they are left out of val/dice{none_left}"
            )
        self.log("val/dice", mean, prog_bar=True)
        self.log("val/dice_empty1", mean_dice([e for _, e in rows])[1])

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        total = max(1, int(self.trainer.estimated_stepping_batches))
        return adamw_warmup_cosine(
            self._groups(), hp.lr, hp.min_lr, hp.warmup_steps, total, hp.get("encoder_hold_steps", 0)
        )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Everything inference needs without the export folder: encoder spec, preprocessing, norm."""
        checkpoint[CKPT_KEY] = {**self.source_record, "inputs": inputs_record(self.trainer.datamodule)}

    def _groups(self, include_frozen: bool = False) -> list[dict[str, Any]]:
        hp = self.hparams
        return layer_decay_groups(
            self.net.named_parameters(),
            depth=self.depth,
            layer_decay=hp.layer_decay,
            weight_decay=hp.weight_decay,
            encoder_prefix=ENCODER_PREFIX[hp.decoder],
            include_frozen=include_frozen,
        )

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Resume runs saved while parameters now frozen were still in the optimizer (MONAI UNETR's unused
        cross-attention norms, frozen since 2026-12-07 so that plain DDP works)."""
        trained = {name for name, p in self.net.named_parameters() if p.requires_grad}
        if "optimizer_states" in checkpoint and len(trained) < sum(1 for _ in self.net.parameters()):
            saved_names = [g["names"] for g in self._groups(include_frozen=True)]
            checkpoint["optimizer_states"] = [
                drop_untrained(s, saved_names, trained) for s in checkpoint["optimizer_states"]
            ]


@dataclass(frozen=True)
class LoadedSegmenter:
    """A fine-tuned segmenter ready for prediction, with the input rule its fine-tuning used."""

    net: Segmenter
    preprocessing: Preprocessor
    num_classes: int
    nifti_modality: str | None


def load_segmenter(ckpt_path: str | Path) -> LoadedSegmenter:
    """A fine-tuned segmenter for inference from its checkpoint alone (read safely, ``weights_only``).

    The checkpoint is untrusted: its record and hyper-parameters go through the card's validator and
    its tensors are compared with the network they describe (on the meta device) before the network is
    built; every refusal is one ``ValueError`` line naming the file and the field.
    """
    from medmae.export.card import LIMITS, check_state_shapes, read_bool, read_choice, read_int

    ckpt = read_finetune_checkpoint(ckpt_path, CKPT_KEY, "finetune-seg")
    hp, where = ckpt.hparams, str(ckpt.path)
    source = EncoderSource.from_record(ckpt.record, where)
    num_classes = read_int(hp, "num_classes", where, 2, LIMITS["num_classes"])
    feature_size = read_int(hp, "feature_size", where, 1, LIMITS["feature_size"])
    cls_token = read_bool(hp, "cls_token", where)
    decoder = read_choice(hp, "decoder", where, DECODERS, default="unetr")
    tap_norm = read_bool(hp, "tap_norm", where, default=True)
    modality = recorded_modality(ckpt.inputs, where)

    def build() -> Segmenter:
        return build_segmenter(source, num_classes, feature_size, cls_token, decoder=decoder, tap_norm=tap_norm)

    check_state_shapes(build, ckpt.net_state, where, f"the recorded {decoder} segmenter")
    net = build()
    net.load_state_dict(ckpt.net_state, strict=True)
    return LoadedSegmenter(net.eval(), source.preprocessing, num_classes, modality)
