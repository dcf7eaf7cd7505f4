"""The card's ``encoder`` section checked into an :class:`~medmae.export.card.EncoderSpec` (2D, timm)
or :class:`~medmae.export.card.EncoderSpec3D`: types, limits, allowed timm kwargs, the size of what it
builds (a 2D encoder is built on PyTorch's ``meta`` device: shapes only, no memory), and the stored
weight shapes against that build.

Split out of :mod:`medmae.export.card` (issue 19): the one place that knows what a valid encoder is,
used by the card loader and the fine-tuning record checks alike. Import the public names from
:mod:`medmae.export.card`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from medmae.export.card_types import (
    ARCH_3D,
    ENCODER_KWARGS,
    LIMITS,
    LOADERS_3D,
    CardError,
    EncoderSpec,
    EncoderSpec3D,
)
from medmae.export.card_untrusted import _bad, _int, _number, _some


def is_3d_encoder(enc: Any) -> bool:
    """Whether a (raw) ``encoder`` section describes a 3D encoder (by ``arch`` or ``spatial_dims``)."""
    return isinstance(enc, dict) and (enc.get("arch") == ARCH_3D or enc.get("spatial_dims") == 3)


def check_encoder_section(enc: Any, where: str, *, any_vit: bool = False) -> EncoderSpec | EncoderSpec3D:
    """Validate the ``encoder`` section of a card (types, limits, allowed kwargs, size); 2D or 3D.

    ``any_vit``: accept any timm architecture that builds a ``VisionTransformer`` (a ``timm:NAME``
    fine-tuning record), not only ``vit_*`` names.
    """
    if not isinstance(enc, dict):
        raise _bad(where, "encoder", f"must be an object, got {type(enc).__name__}")
    if is_3d_encoder(enc):
        return check_encoder_section_3d(enc, where)
    return _check_encoder_section_2d(enc, where, any_vit)


def check_encoder_2d(enc: Any, where: str, loader: str) -> EncoderSpec:
    """:func:`check_encoder_section` for a loader that only takes 2D (timm) encoders: a 3D export gets
    one :class:`CardError` line saying so and what to use instead."""
    spec = check_encoder_section(enc, where)
    if isinstance(spec, EncoderSpec3D):
        raise refuse_3d(where, loader)
    return spec


def refuse_3d(where: str, loader: str) -> CardError:
    """The one-line error of a 2D-only loader given a 3D export."""
    return CardError(
        f"{where}: field 'encoder.arch' is {ARCH_3D!r}, a 3D encoder; {loader} takes 2D encoders only: use {LOADERS_3D}"
    )


def check_encoder_section_3d(enc: dict[str, Any], where: str) -> EncoderSpec3D:
    """Validate a 3D ``encoder`` section (``MaskedAutoencoder3D.encoder_config()``); errors name the field.

    Keys outside the documented set are ignored (they never reach a constructor)."""
    fields = ("arch", "spatial_dims", "in_chans", "img_size", "patch_size", "embed_dim", "depth", "num_heads")
    for key in (*fields, "mlp_ratio", "cls_token", "qkv_bias", "layer_norm_eps"):
        if key not in enc:
            raise _bad(where, f"encoder.{key}", "is missing")
    if enc["arch"] != ARCH_3D:
        raise _bad(where, "encoder.arch", f"must be {ARCH_3D!r} for a 3D encoder, got {enc['arch']!r}")
    if enc["spatial_dims"] != 3 or isinstance(enc["spatial_dims"], bool):
        raise _bad(where, "encoder.spatial_dims", f"must be 3 for {ARCH_3D}, got {enc['spatial_dims']!r}")
    in_chans = _int(enc["in_chans"], where, "encoder.in_chans", 1, LIMITS["in_chans"])
    img_size, patch = _grid(enc, where, "[S0, S1, S2]")
    embed_dim = _int(enc["embed_dim"], where, "encoder.embed_dim", 1, LIMITS["embed_dim"])
    if embed_dim % 6:
        raise _bad(where, "encoder.embed_dim", f"must be a multiple of 6 (3D sin-cos positions), got {embed_dim}")
    depth = _int(enc["depth"], where, "encoder.depth", 1, LIMITS["depth"])
    heads = _int(enc["num_heads"], where, "encoder.num_heads", 1, LIMITS["num_heads"])
    if embed_dim % heads:
        raise _bad(where, "encoder.num_heads", f"{heads} does not divide embed_dim {embed_dim}")
    mlp_ratio = _number(enc["mlp_ratio"], where, "encoder.mlp_ratio", 0.0, 64.0)
    if int(embed_dim * mlp_ratio) < 1:
        raise _bad(where, "encoder.mlp_ratio", f"{mlp_ratio!r} gives no MLP width for embed_dim {embed_dim}")
    for key in ("cls_token", "qkv_bias"):
        if not isinstance(enc[key], bool):
            raise _bad(where, f"encoder.{key}", f"must be true or false, got {enc[key]!r}")
    if not enc["qkv_bias"]:
        raise _bad(where, "encoder.qkv_bias", "is false; medmae 3D encoders (and the MONAI ViT they load into) have it")
    eps = _number(enc["layer_norm_eps"], where, "encoder.layer_norm_eps", 0.0, 0.1)
    tokens = _check_tokens(img_size, patch, where, "encoder.img_size")
    block = 4 * embed_dim * embed_dim + 2 * embed_dim * int(embed_dim * mlp_ratio)
    _check_params(depth * block + (tokens + 1) * embed_dim + in_chans * patch**3 * embed_dim, where,
                  "encoder.depth", f"{depth} blocks of width {embed_dim}")  # fmt: skip
    return EncoderSpec3D(
        ARCH_3D,
        in_chans,
        img_size,
        patch,
        embed_dim,
        depth,
        heads,
        mlp_ratio,
        enc["cls_token"],
        True,
        eps,  # type: ignore[arg-type]
    )


def _grid(enc: dict[str, Any], where: str, layout: str) -> tuple[tuple[int, ...], int]:
    """``(img_size, patch_size)`` of an encoder section: ``layout`` names the sides (2 or 3), each a
    multiple of the patch."""
    size, sides = enc["img_size"], layout.count(",") + 1
    if not isinstance(size, list | tuple) or len(size) != sides:
        raise _bad(where, "encoder.img_size", f"must be {layout}, got {size!r}")
    img_size = tuple(_int(s, where, "encoder.img_size", 1, LIMITS["img_size"]) for s in size)
    if math.prod(img_size) > LIMITS["voxels"]:
        raise _bad(where, "encoder.img_size", f"{list(img_size)} exceeds {LIMITS['voxels']} pixels/voxels per input")
    patch = _int(enc["patch_size"], where, "encoder.patch_size", 1, LIMITS["patch_size"])
    if any(s % patch for s in img_size):
        raise _bad(where, "encoder.img_size", f"{list(img_size)} is not a multiple of patch_size {patch}")
    return img_size, patch


def _check_tokens(size: Sequence[int], patch: int, where: str, field: str) -> int:
    """Patches of one input of ``size``; :class:`CardError` above ``LIMITS['tokens']``."""
    tokens = math.prod(max(1, int(s) // patch) for s in size)
    if tokens > LIMITS["tokens"]:
        raise _bad(where, field, f"{list(size)} makes {tokens} patches of {patch}, more than {LIMITS['tokens']}")
    return tokens


def _check_params(params: int, where: str, field: str, what: str) -> None:
    if params > LIMITS["params"]:
        raise _bad(
            where,
            field,
            f"gives {what}: about {params / 1e9:.3g}e9 parameters, more than {LIMITS['params'] / 1e9:.3g}e9",
        )


@dataclass(frozen=True)
class _MetaEncoder:
    """Sizes of a timm encoder built on the meta device (no memory): what a card's 2D section builds."""

    shapes: dict[str, tuple[int, ...]]
    embed_dim: int
    patch_size: int
    params: int
    is_vit: bool
    error: str | None = None


@functools.lru_cache(maxsize=64)
def _meta_timm(
    arch: str, kwargs: tuple[tuple[str, Any], ...], in_chans: int, img_size: tuple[int, int]
) -> _MetaEncoder:
    import timm
    import torch
    from timm.models.vision_transformer import VisionTransformer

    build = {k: v for k, v in kwargs if k != "drop_path_rate"}  # the rate list is computed with .item()
    try:
        with torch.device("meta"):
            model = timm.create_model(
                arch, pretrained=False, num_classes=0, in_chans=in_chans, img_size=img_size, **build
            )
    except Exception as e:  # noqa: BLE001 - timm raises TypeError / AssertionError / ValueError by argument
        detail = str(e).strip().splitlines()[0][:160] if str(e).strip() else e.__class__.__name__
        return _MetaEncoder({}, 0, 0, 0, False, f"{e.__class__.__name__}: {detail}")
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", (0,))
    return _MetaEncoder(
        shapes,
        int(getattr(model, "embed_dim", 0)),
        int(patch[0] if isinstance(patch, tuple | list) else patch),
        sum(p.numel() for p in model.parameters()),
        isinstance(model, VisionTransformer),
    )


def meta_encoder(spec: EncoderSpec) -> _MetaEncoder:
    """The card's 2D encoder built on PyTorch's ``meta`` device (cached): tensor shapes, parameter count."""
    return _meta_timm(spec.arch, tuple(sorted(spec.kwargs.items())), spec.in_chans, tuple(spec.img_size))


def check_weight_shapes(spec: EncoderSpec | EncoderSpec3D, shapes: Mapping[str, Sequence[int]], where: str) -> None:
    """Every tensor the card's 2D encoder has must be in the weights with the same shape (read from the
    safetensors header, before anything is loaded or built); :class:`CardError` names the first that is
    not. Extra tensors are left to the loaders, which name them. 3D encoders: ``check_weights3d``."""
    if isinstance(spec, EncoderSpec3D):
        return
    meta = meta_encoder(spec)
    for key, want in meta.shapes.items():
        got = tuple(int(d) for d in shapes.get(key, want))
        if got != want:
            raise CardError(
                f"{where}: weights '{key}' have shape {list(got)} but the card's encoder {spec.arch} "
                f"(with {spec.kwargs}) needs {list(want)}"
            )
    missing = [k for k in meta.shapes if k not in shapes]
    if missing:
        raise CardError(f"{where}: the weights lack {_some(missing)}, which the card's encoder {spec.arch} has")


def _check_encoder_section_2d(enc: dict[str, Any], where: str, any_vit: bool = False) -> EncoderSpec:
    import timm

    for key in ("arch", "kwargs", "in_chans", "img_size", "patch_size", "embed_dim"):
        if key not in enc:
            raise _bad(where, f"encoder.{key}", "is missing")
    arch = enc["arch"]
    if not isinstance(arch, str) or not (any_vit or arch.startswith("vit_")) or not timm.is_model(arch):
        raise _bad(where, "encoder.arch", f"must name a timm VisionTransformer (vit_*), got {arch!r}")
    kwargs = enc["kwargs"]
    if not isinstance(kwargs, dict):
        raise _bad(where, "encoder.kwargs", f"must be an object, got {type(kwargs).__name__}")
    for key, value in kwargs.items():
        if key not in ENCODER_KWARGS:
            raise _bad(where, f"encoder.kwargs.{key}", f"is not an encoder size key; allowed: {sorted(ENCODER_KWARGS)}")
        typ = ENCODER_KWARGS[key]
        if isinstance(value, bool) and typ is not bool or not isinstance(value, typ):
            raise _bad(where, f"encoder.kwargs.{key}", f"has the wrong type: {value!r}")
        if key in LIMITS:
            _int(value, where, f"encoder.kwargs.{key}", 1, LIMITS[key])
        elif typ is not bool and not (math.isfinite(value) and 0 <= value <= 64):
            raise _bad(where, f"encoder.kwargs.{key}", f"is out of range: {value!r}")
    in_chans = _int(enc["in_chans"], where, "encoder.in_chans", 1, LIMITS["in_chans"])
    img_size, patch = _grid(enc, where, "[height, width]")
    embed_dim = _int(enc["embed_dim"], where, "encoder.embed_dim", 1, LIMITS["embed_dim"])
    for key, value in (("embed_dim", embed_dim), ("patch_size", patch)):
        if key in kwargs and kwargs[key] != value:
            raise _bad(where, f"encoder.kwargs.{key}", f"is {kwargs[key]} but encoder.{key} is {value}")
    tokens = _check_tokens(img_size, patch, where, "encoder.img_size")
    if "depth" in kwargs:  # fail fast, before even a meta build, on a size no real encoder has
        width = int(embed_dim * kwargs.get("mlp_ratio", 4.0))
        block = 4 * embed_dim * embed_dim + 2 * embed_dim * width
        _check_params(kwargs["depth"] * block + tokens * embed_dim, where, "encoder.kwargs.depth",
                      f"{kwargs['depth']} blocks of width {embed_dim}")  # fmt: skip
    spec = EncoderSpec(arch, dict(kwargs), in_chans, img_size, patch, embed_dim)  # type: ignore[arg-type]
    meta = meta_encoder(spec)
    if meta.error is not None:
        raise _bad(where, "encoder.arch", f"{arch!r} with kwargs {kwargs} does not build ({meta.error})")
    if not meta.is_vit:
        raise _bad(where, "encoder.arch", f"{arch!r} does not build a timm VisionTransformer")
    _check_params(meta.params, where, "encoder.arch", f"{arch!r} with kwargs {kwargs}")
    for key, built in (("embed_dim", meta.embed_dim), ("patch_size", meta.patch_size)):
        if built != getattr(spec, key):
            raise _bad(
                where, f"encoder.{key}", f"is {getattr(spec, key)} but {arch!r} with kwargs {kwargs} builds {built}"
            )
    return spec


def check_encoder_input(
    spec: EncoderSpec | EncoderSpec3D, size: Sequence[int], channels: int, where: str, field: str
) -> None:
    """The network built for an input of ``size`` (``preprocessing.image_size`` / ``volume.size``) and
    ``channels`` stays within the limits, and the channels are the encoder's."""
    if channels != spec.in_chans:
        raise CardError(f"{where}: preprocessing yields {channels} channel(s) but encoder.in_chans is {spec.in_chans}")
    _check_tokens(size, spec.patch_size, where, field)
