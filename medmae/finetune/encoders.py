"""Where a fine-tuning encoder comes from: ``--init medmae:DIR | random[:DIR] | random-sincos:DIR | timm:NAME``.

The starts build the *same* downstream model so a transfer comparison is one flag apart:

* ``medmae:DIR`` — an export folder: its card gives architecture and preprocessing, its weights load.
* ``random:DIR`` (or ``random`` with ``card: DIR``) — the same architecture and preprocessing,
  weights left at their initialisation: the baseline at an identical budget.
* ``random-sincos:DIR`` — ``random:DIR`` with one difference: the position embeddings are the
  pretrained network's (the MAE's fixed 2D/3D sin-cos positions, as ``medmae:DIR`` loads them). The
  fair baseline: a gain over it is not the sin-cos prior, which needs no pretraining.
* ``timm:NAME`` — a timm ViT with timm's pretrained weights (from the local timm / Hugging Face
  cache: nothing is downloaded here; a missing cache is a clear error). Its preprocessing is the
  default 2D one (axial planes, percentiles / soft-tissue CT window) followed by the model's own
  mean/std normalisation, and its patch embedding is folded to the input's channels by the
  equal-channel rule.

A 3D export (``arch: medmae_vit3d``) gives a source with an :class:`~medmae.export.card.EncoderSpec3D`
and a :class:`~medmae.data.volume_transform.VolumePreprocessor` (``spatial_dims == 3``): the
segmentation fine-tuning then builds MONAI ``UNETR(spatial_dims=3)`` (:mod:`medmae.finetune.segment3d`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medmae.data.plane_transform import PlanePreprocessor
from medmae.data.transform_record import TRANSFORMS, Transform
from medmae.data.transforms import DEFAULT_CT_WINDOWS
from medmae.export.adapt import adapt_patch_embed_channels
from medmae.export.card import (
    CARD_NAME,
    CardError,
    EncoderSpec,
    EncoderSpec3D,
    check_encoder_input,
    check_encoder_section,
    check_finetune_record,
    load_card,
)
from medmae.export.card_fields import preprocessing_from_card
from medmae.export.encoder import read_encoder_weights
from medmae.export.unetr3d import check_weights3d

Preprocessor = Transform  # the card's input transform: planes (2D / 2.5D) or volumes (3D)

INIT_KINDS = ("medmae", "random", "random-sincos", "timm")
#: the starts that read an export folder (its card; ``medmae`` and ``random-sincos`` also its weights)
EXPORT_KINDS = ("medmae", "random", "random-sincos")
#: names of the parameters holding position embeddings (timm ViT; MONAI ViT's patch embedding)
POSITION_PARAMETERS = ("pos_embed", "position_embeddings")


@dataclass(frozen=True)
class EncoderInit:
    """A parsed ``--init``: kind, export folder or timm name, and the card (``None`` for timm)."""

    kind: str
    export_dir: Path | None = None
    timm_name: str | None = None
    card: dict[str, Any] | None = field(default=None, compare=False, repr=False)

    def describe(self) -> str:
        """For logs and checkpoints: the kind and the export folder's name (never a full path)."""
        if self.kind == "timm":
            return f"timm:{self.timm_name}"
        return f"{self.kind}:{self.export_dir.name if self.export_dir else ''}"


def parse_init(init: str, card: str | Path | None = None) -> EncoderInit:
    """Parse ``medmae:DIR``, ``random:DIR``, ``random-sincos:DIR``, ``random`` (+ ``card``) or ``timm:NAME``;
    ValueError names the field."""
    if not isinstance(init, str) or not init:
        raise ValueError(f"init must be medmae:DIR, random[:DIR], random-sincos:DIR or timm:NAME, got {init!r}")
    kind, _, rest = init.partition(":")
    if kind not in INIT_KINDS:
        raise ValueError(
            f"init must start with one of {INIT_KINDS} (medmae:DIR, random:DIR, random-sincos:DIR, timm:NAME), "
            f"got {init!r}"
        )
    if kind == "timm":
        if not rest:
            raise ValueError("init timm:NAME needs a timm model name, e.g. timm:vit_base_patch16_224")
        return EncoderInit("timm", timm_name=rest)
    source = rest or (str(card) if card else "")
    if not source:
        raise ValueError(f"init {init!r} needs an export folder: write {kind}:DIR, or set card: DIR")
    export_dir = Path(source)
    return EncoderInit(kind, export_dir=export_dir, card=load_card(export_dir))


def default_preprocessing(image_size: tuple[int, int], in_chans: int = 1) -> PlanePreprocessor:
    """The 2D input used for encoders without a medmae card (``timm:NAME``)."""
    offsets = tuple(range(-((in_chans - 1) // 2), in_chans // 2 + 1))
    return PlanePreprocessor(
        axis="axial",
        image_size=image_size,
        slice_offsets=offsets,
        interpolation="bilinear",
        antialias=True,
        ct_windows=DEFAULT_CT_WINDOWS,
        ct_window_mode="random",
        inference_window=0,
        percentiles=(0.5, 99.5),
    )


class InputNorm(nn.Module):
    """``(x - mean) / std`` per channel: a timm model's own normalisation in front of it."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


@dataclass
class EncoderSource:
    """Everything a downstream builder needs: architecture, weights (or None), input pipeline."""

    init: EncoderInit
    spec: EncoderSpec | EncoderSpec3D
    state: dict[str, torch.Tensor] | None
    preprocessing: Preprocessor
    input_norm: InputNorm | None = None

    @property
    def positions_only(self) -> bool:
        """``random-sincos``: of the weights in :attr:`state`, only the position embeddings are used."""
        return self.init.kind == "random-sincos"

    @property
    def spatial_dims(self) -> int:
        """3 for a volumetric (``medmae_vit3d``) encoder, else 2."""
        return 3 if isinstance(self.spec, EncoderSpec3D) else 2

    def record(self) -> dict[str, Any]:
        """What a fine-tuning checkpoint keeps to rebuild the network without the export folder."""
        norm = self.input_norm
        return {
            "spatial_dims": self.spatial_dims,
            "encoder": dataclasses.asdict(self.spec),
            "preprocessing": self.preprocessing.settings(),
            "input_norm": None if norm is None else (norm.mean.flatten().tolist(), norm.std.flatten().tolist()),
            "init": self.init.describe(),
        }

    @classmethod
    def from_record(cls, record: dict[str, Any], where: str = "checkpoint") -> EncoderSource:
        """The architecture and input pipeline of :meth:`record` (no weights: the checkpoint has them).

        The record is untrusted: every field goes through the card's validator
        (:func:`~medmae.export.card.check_finetune_record`: types, limits, allowed timm kwargs, finite
        percentiles, input normalisation with std > 0); a bad one is a :class:`CardError` line naming
        ``where`` and the field. Fields absent in older checkpoints keep their old meaning.
        """
        checked = check_finetune_record(record, where)
        pre = TRANSFORMS[checked.spatial_dims](**checked.preprocessing)
        norm = None if checked.input_norm is None else InputNorm(*checked.input_norm)  # always None in 3D
        return cls(EncoderInit("random"), checked.spec, None, pre, norm)


def resolve_preprocessing(init: EncoderInit) -> Preprocessor:
    """Only the input pipeline of ``init`` (data modules need no weights): the card's, or the timm default."""
    if init.kind in EXPORT_KINDS:
        assert init.export_dir is not None and init.card is not None
        return preprocessing_from_card(init.card, where=str(init.export_dir / CARD_NAME))
    import timm

    if not timm.is_model(init.timm_name):
        raise ValueError(f"init timm:{init.timm_name}: not a timm model name")
    cfg = timm.models.get_pretrained_cfg(init.timm_name)
    size = tuple(int(s) for s in (cfg.input_size[1:] if cfg is not None else (224, 224)))
    return default_preprocessing(size, 1)  # type: ignore[arg-type]


def resolve_encoder(init: EncoderInit) -> EncoderSource:
    """Load (or not) the encoder named by ``init`` (timm models get one input channel)."""
    if init.kind in EXPORT_KINDS:
        assert init.export_dir is not None and init.card is not None
        where = str(init.export_dir / CARD_NAME)
        spec = check_encoder_section(init.card["encoder"], where)
        pre = preprocessing_from_card(init.card, where=where)
        if pre.spatial_dims != (3 if isinstance(spec, EncoderSpec3D) else 2):
            raise CardError(f"{where}: field 'preprocessing.spatial_dims' does not match encoder.arch {spec.arch!r}")
        # channels; patches within the limits
        check_encoder_input(spec, pre.input_size, pre.channels, where, pre.size_field)
        state = read_encoder_weights(init.export_dir, init.card) if init.kind != "random" else None
        if state is not None and isinstance(spec, EncoderSpec3D):
            check_weights3d(spec, state, where)
        return EncoderSource(init, spec, state, pre)
    return _timm_source(init, 1)


def build_network(source: EncoderSource, build: Callable[[EncoderSource], nn.Module]) -> nn.Module:
    """``build(source)``: the downstream network of a start. For ``random-sincos``, the network ``random``
    builds with the position embeddings the pretrained network gets (its other weights untouched).

    The pretrained network is built only to read its positions, under a forked RNG, so the random
    weights are the very ones ``random:DIR`` draws at the same seed.
    """
    if not source.positions_only:
        return build(source)
    random_init = dataclasses.replace(source, init=dataclasses.replace(source.init, kind="random"))
    net = build(dataclasses.replace(random_init, state=None))
    with torch.random.fork_rng(devices=[]):
        pretrained = dict(build(random_init).named_parameters())
    copied = []
    with torch.no_grad():
        for name, param in net.named_parameters():
            if name.rsplit(".", 1)[-1] in POSITION_PARAMETERS:
                param.copy_(pretrained[name])
                copied.append(name)
    if not copied:
        raise ValueError(f"init {source.init.describe()}: the network holds no position embedding to set")
    return net


@contextmanager
def _offline() -> Iterator[None]:
    """Forbid the Hugging Face hub from reaching the network: weights come from the local cache or not at all."""
    import huggingface_hub.constants as hub

    saved_env, saved_flag = os.environ.get("HF_HUB_OFFLINE"), hub.HF_HUB_OFFLINE
    os.environ["HF_HUB_OFFLINE"], hub.HF_HUB_OFFLINE = "1", True
    try:
        yield
    finally:
        hub.HF_HUB_OFFLINE = saved_flag
        if saved_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = saved_env


def _timm_source(init: EncoderInit, in_chans: int) -> EncoderSource:
    import timm
    from timm.models.vision_transformer import VisionTransformer

    name = init.timm_name
    if not timm.is_model(name):
        raise ValueError(f"init timm:{name}: not a timm model name")
    try:
        with _offline():
            model = timm.create_model(name, pretrained=True, num_classes=0)
    except Exception as e:  # hub errors differ by version; nothing may be downloaded here anyway
        raise ValueError(
            f"init timm:{name}: pretrained weights are not available offline ({e.__class__.__name__}); "
            "place them in the local timm/Hugging Face cache, or use medmae:DIR / random:DIR"
        ) from None
    if not isinstance(model, VisionTransformer) or model.cls_token is None:
        raise ValueError(f"init timm:{name}: must be a VisionTransformer with a class token")
    cfg = model.pretrained_cfg
    state = {k: v.detach() for k, v in model.state_dict().items()}
    state["patch_embed.proj.weight"] = adapt_patch_embed_channels(state["patch_embed.proj.weight"], in_chans)
    size = tuple(int(s) for s in model.patch_embed.img_size)
    spec = EncoderSpec(name, {}, in_chans, size, int(model.patch_embed.patch_size[0]), int(model.embed_dim))
    mean = tuple(float(m) for m in cfg.get("mean", (0.0,)))
    std = tuple(float(s) for s in cfg.get("std", (1.0,)))
    grey_mean, grey_std = sum(mean) / len(mean), sum(std) / len(std)  # channels now carry the same plane
    norm = InputNorm((grey_mean,) * in_chans, (grey_std,) * in_chans)
    return EncoderSource(init, spec, state, default_preprocessing(size, in_chans), norm)
