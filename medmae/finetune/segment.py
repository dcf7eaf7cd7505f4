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
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from monai.losses import DiceCELoss
from torch import nn

from medmae.export.encoder import timm_from_encoder
from medmae.export.preprocessing import PlanePreprocessor
from medmae.export.unetr import unetr_from_encoder
from medmae.finetune.encoders import EncoderSource, InputNorm, Preprocessor, parse_init, resolve_encoder
from medmae.finetune.layer_decay import layer_decay_groups
from medmae.finetune.light_decoder import LightSegmenter
from medmae.finetune.schedule import adamw_warmup_cosine
from medmae.finetune.seg_data import PreparedCase
from medmae.finetune.seg_data3d import PreparedVolume
from medmae.finetune.segment3d import build_segmenter3d, predict_volume3d

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
    MONAI UNETR 3D (:func:`~medmae.finetune.segment3d.build_segmenter3d`; ``cls_token`` is the encoder's).
    """
    pre = source.preprocessing
    if source.spatial_dims == 3:
        net: nn.Module = build_segmenter3d(source, num_classes, feature_size, dropout_rate, decoder)
    elif decoder == "unetr":
        net = unetr_from_encoder(
            source.spec,
            source.state,
            num_classes,
            img_size=pre.image_size,
            in_chans=pre.channels,
            feature_size=feature_size,
            cls_token=cls_token,
            dropout_rate=dropout_rate,
            where=source.init.describe(),
        )
    elif decoder == "light":
        encoder = timm_from_encoder(
            source.spec, source.state, None, img_size=pre.image_size, in_chans=pre.channels, proj_drop_rate=dropout_rate
        )
        net = LightSegmenter(encoder, num_classes, feature_size, tap_norm=tap_norm)
    else:
        raise ValueError(f"model.decoder must be one of {DECODERS}, got {decoder!r}")
    return Segmenter(net, source.input_norm)


def dice_per_class(pred: np.ndarray, target: np.ndarray, num_classes: int) -> list[float]:
    """Dice of classes 1..K-1 on whole volumes; a class absent from both counts as 1."""
    out = []
    for k in range(1, num_classes):
        p, t = pred == k, target == k
        denom = int(p.sum()) + int(t.sum())
        out.append(1.0 if denom == 0 else 2.0 * int(np.logical_and(p, t).sum()) / denom)
    return out


@torch.no_grad()
def predict_planes(
    net: nn.Module, images: torch.Tensor, pre: PlanePreprocessor, plane_shape: tuple[int, int], batch: int = 16
) -> np.ndarray:
    """Class map of every plane at its original resolution: ``(Z, h, w)`` uint8."""
    device = next(net.parameters()).device
    out = []
    for start in range(0, images.shape[0], batch):
        logits = net(images[start : start + batch].to(device))
        out.append(pre.restore(logits, plane_shape).argmax(1).to(torch.uint8).cpu())
    return torch.cat(out).numpy()


def predict_case(
    net: nn.Module, case: PreparedCase | PreparedVolume, pre: Preprocessor, batch: int = 16, overlap: float = 0.25
) -> tuple[np.ndarray, np.ndarray]:
    """``(prediction, labels)`` of a validation case on its original grid: planes (2D) or sliding windows (3D)."""
    if isinstance(case, PreparedVolume):
        assert not isinstance(pre, PlanePreprocessor)
        return predict_volume3d(net, case.image, pre, case.shape, case.spacing, overlap, batch), case.label
    assert isinstance(pre, PlanePreprocessor)
    return predict_planes(net, case.images, pre, case.plane_shape, batch), case.label_stack


class SegmentationModule(pl.LightningModule):
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
        self.net = build_segmenter(source, num_classes, feature_size, cls_token, dropout_rate, decoder, tap_norm)
        self.depth = len(self.net.get_submodule(ENCODER_PREFIX[decoder] + "blocks"))
        self.loss = DiceCELoss(to_onehot_y=True, softmax=True, lambda_dice=dice_weight, lambda_ce=ce_weight)
        self._val_dice: list[list[float]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def on_train_epoch_start(self) -> None:
        data = getattr(self.trainer.datamodule, "train_set", None)
        if data is not None:
            data.epoch = int(self.current_epoch)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.loss(self.net(batch["image"]), batch["label"])
        self.log("train/loss", loss, on_step=True, prog_bar=True, batch_size=batch["image"].shape[0])
        return loss

    def validation_step(self, case: PreparedCase | PreparedVolume, batch_idx: int) -> None:
        hp = self.hparams
        pred, truth = predict_case(self.net, case, self.preprocessing, hp.infer_batch, hp.sw_overlap)
        self._val_dice.append(dice_per_class(pred, truth, hp.num_classes))

    def on_validation_epoch_end(self) -> None:
        if not self._val_dice:
            return
        per_class = np.mean(np.asarray(self._val_dice), axis=0)
        for k, d in enumerate(per_class, start=1):
            self.log(f"val/dice_class{k}", float(d))
        self.log("val/dice", float(per_class.mean()), prog_bar=True)
        self._val_dice = []

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        groups = layer_decay_groups(
            self.net.named_parameters(),
            depth=self.depth,
            layer_decay=hp.layer_decay,
            weight_decay=hp.weight_decay,
            encoder_prefix=ENCODER_PREFIX[hp.decoder],
        )
        total = max(1, int(self.trainer.estimated_stepping_batches))
        return adamw_warmup_cosine(groups, hp.lr, hp.min_lr, hp.warmup_steps, total)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Everything inference needs without the export folder: encoder spec, preprocessing, norm."""
        checkpoint[CKPT_KEY] = self.source_record


def load_segmenter(ckpt_path: str | Path) -> tuple[Segmenter, Preprocessor, int]:
    """A fine-tuned segmenter for inference from its checkpoint alone (read safely, ``weights_only``)."""
    ckpt_path = Path(ckpt_path)
    try:
        ckpt = torch.load(str(ckpt_path), map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling / zip / truncation errors differ by torch version
        raise ValueError(f"{ckpt_path}: not a loadable checkpoint ({e.__class__.__name__})") from None
    if not isinstance(ckpt, dict) or CKPT_KEY not in ckpt:
        raise ValueError(f"{ckpt_path}: not a medmae segmentation checkpoint (written by `medmae finetune-seg`)")
    meta, hp = ckpt[CKPT_KEY], ckpt["hyper_parameters"]
    source = EncoderSource.from_record(meta)
    pre = source.preprocessing
    net = build_segmenter(
        source,
        int(hp["num_classes"]),
        int(hp["feature_size"]),
        bool(hp["cls_token"]),
        decoder=str(hp.get("decoder", "unetr")),
        tap_norm=bool(hp.get("tap_norm", True)),
    )
    state = {k[len("net.") :]: v for k, v in ckpt["state_dict"].items() if k.startswith("net.")}
    net.load_state_dict(state, strict=True)
    return net.eval(), pre, int(hp["num_classes"])
