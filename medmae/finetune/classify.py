"""Classification fine-tuning: a timm ViT from the exported encoder (MAE recipe), slice or series level.

Model: :func:`~medmae.export.encoder.timm_from_encoder` with ``global_pool="avg"`` (the encoder's final
``norm`` dropped, a fresh ``fc_norm`` on the averaged patch tokens), drop path, a fresh linear head,
layer-wise lr decay and warmup + cosine. ``timm:NAME`` encoders get their own mean/std in front.

* **slice level**: every plane is a sample; a series is scored by the mean of its planes' probabilities.
* **series level**: the pre-logit features (``fc_norm`` output) of a series' planes are averaged and the
  head classifies the average, so the series is the sample.
* **linear probe** (``linear_probe: true``): the MAE recipe — the encoder is frozen (and kept in eval
  mode), the head is ``BatchNorm1d(affine=False)`` + ``Linear``; only the head trains.

Targets: ``binary`` (one logit, BCE), ``multiclass`` (softmax, cross-entropy with label smoothing, 0.1
by default), ``multilabel`` (one logit per label, BCE). Smoothing for the BCE tasks pulls targets to
0.5 by the same amount. Validation is per series: ``val/auroc`` and ``val/acc`` (torchmetrics; macro
AUROC over classes / labels, accuracy at 0.5 or the arg-max) and ``val/loss`` of the series prediction.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
import torchmetrics
from torch import nn

from medmae.export.card import refuse_3d
from medmae.export.encoder import timm_from_encoder
from medmae.finetune.cls_data import LEVELS, check_target, num_outputs
from medmae.finetune.encoders import EncoderSource, InputNorm, build_network, parse_init, resolve_encoder
from medmae.finetune.gather import Key, gather_unique, val_case_key
from medmae.finetune.layer_decay import layer_decay_groups
from medmae.finetune.samples import EpochHook
from medmae.finetune.schedule import adamw_warmup_cosine
from medmae.finetune.volumes import inputs_record

#: key under which a checkpoint keeps what inference needs besides weights (no paths, no header data)
CKPT_KEY = "medmae_classification"
#: ``avg``: the MAE recipe; ``max`` / ``avgmax``: a focal finding in one patch is not averaged away
POOLS = ("avg", "max", "avgmax", "token")


def pool_series(features: torch.Tensor, series: torch.Tensor, num_series: int) -> torch.Tensor:
    """Mean of the plane features ``(N, D)`` of each series (``series``: ``(N,)`` index) -> ``(B, D)``."""
    total = features.new_zeros(num_series, features.shape[1]).index_add_(0, series, features)
    count = torch.bincount(series, minlength=num_series).clamp_min(1).to(features.dtype)
    return total / count[:, None]


class Classifier(nn.Module):
    """Input normalisation, timm ViT features, optional series pooling, head."""

    def __init__(self, vit: nn.Module, input_norm: InputNorm | None, linear_probe: bool = False) -> None:
        super().__init__()
        self.input_norm = input_norm if input_norm is not None else nn.Identity()
        self.vit = vit
        self.linear_probe = linear_probe
        if linear_probe:
            head = vit.head
            vit.head = nn.Sequential(nn.BatchNorm1d(head.in_features, affine=False, eps=1e-6), head)
            for name, p in vit.named_parameters():
                p.requires_grad_(name.startswith("head."))

    def train(self, mode: bool = True) -> Classifier:
        super().train(mode)
        if self.linear_probe:  # frozen encoder: no drop path, no dropout; the head's BatchNorm trains
            self.vit.eval()
            self.vit.head.train(mode)
        return self

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-logit features ``(N, D)`` of planes ``(N, C, H, W)``."""
        return self.vit.forward_head(self.vit.forward_features(self.input_norm(x)), pre_logits=True)

    def forward(self, x: torch.Tensor, series: torch.Tensor | None = None, num_series: int = 0) -> torch.Tensor:
        f = self.features(x)
        if series is not None:
            f = pool_series(f, series, num_series)
        return self.vit.head(f)


def build_classifier(
    source: EncoderSource, outputs: int, global_pool: str = "avg", drop_path_rate: float = 0.0,
    linear_probe: bool = False,
) -> Classifier:
    """The classifier of an encoder source (weights loaded when it has them): fine-tuning and ``predict-cls``."""
    pre = source.preprocessing

    def build(s: EncoderSource) -> nn.Module:
        return timm_from_encoder(
            s.spec, s.state, s.init.card, global_pool=global_pool, num_classes=outputs,
            drop_path_rate=0.0 if linear_probe else drop_path_rate, img_size=pre.image_size, in_chans=pre.channels,
        )

    return Classifier(build_network(source, build), source.input_norm, linear_probe)


def probabilities(logits: torch.Tensor, task: str) -> torch.Tensor:
    """Softmax for multiclass, a sigmoid per logit for binary / multilabel."""
    return logits.softmax(-1) if task == "multiclass" else logits.sigmoid()


@torch.no_grad()
def series_probabilities(
    net: Classifier, images: torch.Tensor, task: str, level: str, batch: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(series (K,), planes (N, K))`` probabilities of one series ``(N, C, H, W)``.

    Series level: the head on the mean of the planes' features (each plane's own row: the head on its
    features alone); slice level: the mean of the planes' probabilities.
    """
    step = max(1, int(batch))
    feats = torch.cat([net.features(images[i : i + step]) for i in range(0, len(images), step)])
    planes = probabilities(net.vit.head(feats), task)
    if level == "series":
        return probabilities(net.vit.head(feats.mean(0, keepdim=True)), task)[0], planes
    return planes.mean(0), planes


def _metrics(task: str, k: int) -> tuple[torchmetrics.Metric, torchmetrics.Metric]:
    """AUROC and accuracy for ``task``. They do not sync across ranks themselves: under DDP the module
    feeds every rank the gathered series, each once (:mod:`medmae.finetune.gather`), so a sync would
    count each series once per rank and the sampler's repeats twice."""
    from torchmetrics import classification as C

    own = {"sync_on_compute": False}
    if task == "binary":
        return C.BinaryAUROC(**own), C.BinaryAccuracy(**own)
    if task == "multiclass":
        return (C.MulticlassAUROC(num_classes=k, average="macro", **own),
                C.MulticlassAccuracy(num_classes=k, average="micro", **own))
    return (C.MultilabelAUROC(num_labels=k, average="macro", **own),
            C.MultilabelAccuracy(num_labels=k, average="macro", **own))


class ClassificationModule(EpochHook):
    """Fine-tune (or linearly probe) a timm ViT classifier from ``init``.

    Args:
        init: ``medmae:DIR`` | ``random:DIR`` | ``timm:NAME`` (see :mod:`medmae.finetune.encoders`).
        task: ``binary`` | ``multiclass`` | ``multilabel``.
        classes: class values of the label column (binary default ``["0", "1"]``, negative first);
            for multilabel the names of the 0/1 label columns.
        level: ``slice`` or ``series`` (features pooled over the series' planes).
        card: export folder for architecture/preprocessing when ``init`` is plain ``random``.
        linear_probe: freeze the encoder; train only a BatchNorm1d(affine=False) + Linear head.
        global_pool: ``avg`` (MAE fine-tuning: fc_norm on averaged patch tokens), ``max`` / ``avgmax``
            (fc_norm on the per-channel maximum over patch tokens, or the mean of average and maximum:
            a finding smaller than a patch is not diluted by the other tokens) or ``token`` (class token
            through the pretrained final norm).
        lr: peak AdamW learning rate of the head (top layer); lower layers get ``lr * layer_decay**k``.
        min_lr: lr at the end of the cosine.
        layer_decay: lr factor per encoder layer going down (1 = none; ignored by the linear probe).
        weight_decay: AdamW weight decay (not on biases, norms, positions, tokens).
        warmup_steps: linear warmup in optimizer steps.
        encoder_hold_steps: head-first steps (LP-FT): the encoder's embeddings and blocks stay at lr 0 while
            the new head learns on the features as they are, then get their own warmup + cosine.
        drop_path_rate: stochastic depth of the encoder blocks (0 in the linear probe).
        label_smoothing: None = 0.1 for multiclass, 0 for binary / multilabel.
        infer_batch: planes per forward pass in validation.
    """

    def __init__(
        self,
        init: str,
        task: str = "binary",
        classes: list[str | int] | None = None,
        level: str = "slice",
        card: str | None = None,
        linear_probe: bool = False,
        global_pool: str = "avg",
        lr: float = 5e-4,
        min_lr: float = 1e-6,
        layer_decay: float = 0.75,
        weight_decay: float = 0.05,
        warmup_steps: int = 50,
        encoder_hold_steps: int = 0,
        drop_path_rate: float = 0.1,
        label_smoothing: float | None = None,
        infer_batch: int = 64,
    ) -> None:
        super().__init__()
        classes = check_target(task, classes, "model")
        if level not in LEVELS:
            raise ValueError(f"model.level must be one of {LEVELS}, got {level!r}")
        if global_pool not in POOLS:
            raise ValueError(f"model.global_pool must be one of {POOLS}, got {global_pool!r}")
        if not lr > 0 or not 0 <= min_lr <= lr or not weight_decay >= 0:
            raise ValueError(f"model.lr must be > 0 with 0 <= model.min_lr <= lr and weight_decay >= 0, "
                             f"got lr={lr!r}, min_lr={min_lr!r}, weight_decay={weight_decay!r}")
        if not 0.0 < layer_decay <= 1.0:
            raise ValueError(f"model.layer_decay must be in (0, 1], got {layer_decay!r}")
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"model.drop_path_rate must be in [0, 1), got {drop_path_rate!r}")
        smoothing = (0.1 if task == "multiclass" else 0.0) if label_smoothing is None else float(label_smoothing)
        if not 0.0 <= smoothing < 1.0:
            raise ValueError(f"model.label_smoothing must be in [0, 1), got {label_smoothing!r}")
        self.save_hyperparameters()  # only what the user typed; no CSV content, no volume header
        self.classes, self.smoothing = classes, smoothing
        source = resolve_encoder(parse_init(init, card))
        if source.spatial_dims == 3:
            raise refuse_3d(f"model.init {source.init.describe()}", "finetune-cls (timm ViT classifiers)")
        self.source_record = source.record()
        self.spec, self.preprocessing = source.spec, source.preprocessing
        self.net = build_classifier(source, num_outputs(task, classes), global_pool, drop_path_rate, linear_probe)
        self.depth = len(self.net.vit.blocks)
        self.auroc, self.acc = _metrics(task, num_outputs(task, classes) if task != "binary" else 1)
        self._val_series: list[tuple[Key, tuple[torch.Tensor, torch.Tensor]]] = []  # (key, (probs, target))

    # ------------------------------------------------------------------ targets and losses

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Training loss of logits ``(B, K)`` against CSV targets ``(B, T)``."""
        if self.hparams.task == "multiclass":
            return F.cross_entropy(logits, target[:, 0].long(), label_smoothing=self.smoothing)
        soft = target * (1.0 - self.smoothing) + 0.5 * self.smoothing
        return F.binary_cross_entropy_with_logits(logits, soft)

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        return probabilities(logits, self.hparams.task)

    def _prob_loss(self, probs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Log loss of series probabilities (no smoothing: the validation loss is the plain one)."""
        probs = probs.clamp(1e-7, 1 - 1e-7)
        if self.hparams.task == "multiclass":
            return F.nll_loss(probs.log(), target[:, 0].long())
        return F.binary_cross_entropy(probs, target)

    # ------------------------------------------------------------------ steps

    def forward(self, x: torch.Tensor, series: torch.Tensor | None = None, num_series: int = 0) -> torch.Tensor:
        return self.net(x, series, num_series)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        target = batch["target"]
        if self.hparams.level == "series":
            logits = self.net(batch["image"], batch["series"], target.shape[0])
        else:
            logits = self.net(batch["image"])
        loss = self.loss(logits, target)
        self.log("train/loss", loss, on_step=True, prog_bar=True, batch_size=target.shape[0])
        return loss

    def series_probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """``(K,)`` probabilities of one series ``(N, C, H, W)`` (:func:`series_probabilities`)."""
        hp = self.hparams
        return series_probabilities(self.net, images, hp.task, hp.level, hp.infer_batch)[0]

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        probs = self.series_probabilities(batch["image"])[None].float()
        # per series: (key, (probabilities, target)) on the CPU; the epoch end gathers every rank's
        # series, drops the distributed sampler's repeats by key, and scores them all at once
        key = val_case_key(self.trainer, batch_idx)
        self._val_series.append((key, (probs.cpu(), batch["target"].float().cpu())))

    def on_validation_epoch_end(self) -> None:
        """``val/loss``, ``val/auroc``, ``val/acc`` over every validation series of every rank, each once."""
        series = gather_unique(self._val_series)  # a collective under DDP: every rank runs it
        self._val_series = []
        self.auroc.reset()
        self.acc.reset()
        if not series or self.trainer.sanity_checking:  # a few sanity series: metrics would mislead
            return
        probs = torch.cat([p for p, _ in series]).to(self.device)
        target = torch.cat([t for _, t in series]).to(self.device)
        self.log("val/loss", float(self._prob_loss(probs, target)), prog_bar=True)  # mean over series
        if self.hparams.task == "binary":
            probs, target = probs[:, 0], target[:, 0].long()
        elif self.hparams.task == "multiclass":
            target = target[:, 0].long()
        else:
            target = target.long()
        self.auroc.update(probs, target)
        self.acc.update(probs, target)
        self.log("val/auroc", float(self.auroc.compute()), prog_bar=True)
        self.log("val/acc", float(self.acc.compute()), prog_bar=True)
        self.auroc.reset()
        self.acc.reset()

    # ------------------------------------------------------------------ optimisation

    def param_groups(self) -> list[dict[str, Any]]:
        """AdamW groups with ``lr_scale = layer_decay ** (depth + 1 - layer)`` (trainable parameters only)."""
        hp = self.hparams
        decay = 1.0 if hp.linear_probe else hp.layer_decay
        return layer_decay_groups(self.net.named_parameters(), depth=self.depth, layer_decay=decay,
                                  weight_decay=hp.weight_decay, encoder_prefix="vit.")

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        total = max(1, int(self.trainer.estimated_stepping_batches))
        return adamw_warmup_cosine(
            self.param_groups(), hp.lr, hp.min_lr, hp.warmup_steps, total, hp.get("encoder_hold_steps", 0)
        )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """What inference needs besides weights: encoder spec, preprocessing, input norm, classes."""
        checkpoint[CKPT_KEY] = {
            **self.source_record,
            "task": self.hparams.task,
            "classes": list(self.classes),
            "level": self.hparams.level,
            "inputs": inputs_record(self.trainer.datamodule),
        }
