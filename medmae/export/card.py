"""The export card (``encoder.json``): what it holds and how a reader checks it before trusting it.

An export folder is something people copy between machines and hospitals, so a loader treats the
card as untrusted input: every field is type- and range-checked, the weights path must name a file
inside the export folder, and only a fixed set of encoder size keys reaches ``timm.create_model``
(a card cannot smuggle ``checkpoint_path``, ``pretrained`` or any other timm argument). Every error
is one :class:`CardError` line naming the card and the field.

Card layout (``format`` 1)::

    {"format": 1, "producer": "medmae 0.1.0", "weights": "encoder.safetensors",
     "encoder": {"arch": "vit_tiny_patch16_224", "kwargs": {"depth": 4, "patch_size": 8},
                 "in_chans": 1, "img_size": [64, 64], "patch_size": 8, "embed_dim": 192},
     "pretraining": {"method": "mae", "mask_ratio": 0.75, "norm_pix_loss": false, ...},
     "preprocessing": {... CacheDataModule.preprocessing() ...},
     "versions": {"medmae": "...", "timm": "...", "torch": "..."}}

``versions`` are the libraries that wrote the export; ``preprocessing.versions`` those that ran the
pretraining data pipeline. ``preprocessing`` is everything needed to rebuild the encoder's input
(:func:`medmae.export.preprocessing_from_card` reads and checks the fields it uses): ``axis``,
``image_size``, ``slice_offsets`` with ``slice_spacing_mm`` (null: adjacent planes by index; absent in
older cards, same meaning) and ``slice_interpolation``, ``resize``, ``intensity`` (``ct.windows_level_width``,
``ct.mode``, ``ct.inference_window``; ``other.percentiles`` and ``other.percentile_rule``: over which
voxels and after which lookup tables), and ``training_data``: counts of the training series, slices and
patients actually used, by modality, source and kind (counts only, never an id).

3D encoders (``arch: medmae_vit3d``, :class:`~medmae.models.mae3d.MaskedAutoencoder3D`) have no timm
model: their ``encoder`` section is ``MaskedAutoencoder3D.encoder_config()`` (``spatial_dims: 3``,
``in_chans``, ``img_size [S0, S1, S2]``, ``patch_size``, ``embed_dim``, ``depth``, ``num_heads``,
``mlp_ratio``, ``cls_token``, ``qkv_bias``, ``layer_norm_eps``), checked into :class:`EncoderSpec3D`, and
their ``preprocessing`` is ``VolumeTransform.describe()`` (``spatial_dims: 3``, ``volume.size``,
``volume.spacing_mm``, the same ``intensity`` section; see :mod:`medmae.export.volume_preprocessing`).
They load into MONAI ``ViT`` / ``UNETR(spatial_dims=3)`` (:mod:`medmae.export.unetr3d`); the 2D loaders
refuse them in one line that says what to use instead.

Untrusted records
-----------------
This module is the one validator of every record medmae reads back from disk: the card (its JSON is
parsed only after a scan has shown it nests at most :data:`MAX_JSON_DEPTH` levels, so a 200,000-deep
file is a one-line error, not a ``RecursionError``), and the record a fine-tuning checkpoint carries
(:func:`check_finetune_record`: the same encoder and preprocessing checks on the checkpoint's layout,
the input normalisation, and the hyper-parameters through :func:`read_int` / :func:`read_bool` /
:func:`read_choice`). :data:`LIMITS` bounds every size a record can ask for (sides, tokens, voxels,
parameters, classes, decoder width) so no allocation follows from a hostile number, and
:func:`check_weight_shapes` compares the stored tensors with the encoder the record describes
(built on PyTorch's ``meta`` device: shapes only, no memory) before any real model is built.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CARD_FORMAT = 1
WEIGHTS_NAME = "encoder.safetensors"
CARD_NAME = "encoder.json"

#: Encoder size keys a card may pass to ``timm.create_model`` (and their accepted Python types).
ENCODER_KWARGS: dict[str, type | tuple[type, ...]] = {
    "embed_dim": int,
    "depth": int,
    "num_heads": int,
    "mlp_ratio": (int, float),
    "patch_size": int,
    "qkv_bias": bool,
    "drop_path_rate": (int, float),
}
#: Largest weights file a card may point at (a ViT-Giant is ~4 GB in fp32).
MAX_WEIGHTS_BYTES = 16 * 1024**3
#: Sanity limits: a record beyond them is corrupt or hostile, not a real encoder or fine-tuning run.
#: ``img_size`` bounds every side (encoder and ``preprocessing.image_size`` / ``volume.size``),
#: ``voxels`` the pixels (2D) or voxels (3D) of one encoder input, ``tokens`` the patches of one input,
#: ``params`` an encoder's parameter count (as many fp32 numbers as the largest weights file holds),
#: ``num_classes`` a segmentation's classes (masks are uint8), ``feature_size`` the decoder width.
LIMITS = {
    "in_chans": 64,
    "img_size": 4096,
    "patch_size": 64,
    "embed_dim": 8192,
    "depth": 256,
    "num_heads": 256,
    "voxels": 4096 * 4096,
    "tokens": 65536,
    "params": MAX_WEIGHTS_BYTES // 4,
    "num_classes": 256,
    "feature_size": 256,
}
#: Deepest nesting of JSON a card may have (a real card nests 5 levels); checked before parsing.
MAX_JSON_DEPTH = 64
#: Largest card file (a real one is a few kB).
MAX_CARD_BYTES = 4 * 1024**2


#: ``encoder.arch`` of a 3D export (medmae's own ViT over cubic patches; timm has no 3D ViT)
ARCH_3D = "medmae_vit3d"
#: what to call instead when a 2D loader is given a 3D export
LOADERS_3D = "medmae.export.build_unetr3d_from_export(DIR, out_channels) or load_vit3d(DIR)"


class CardError(ValueError):
    """The export card is missing, unreadable or has a field with a wrong type or value."""


@dataclass(frozen=True)
class EncoderSpec:
    """The checked ``encoder`` section: everything needed to rebuild the timm ViT (no weights)."""

    arch: str
    kwargs: dict[str, Any]
    in_chans: int
    img_size: tuple[int, int]
    patch_size: int
    embed_dim: int


@dataclass(frozen=True)
class EncoderSpec3D:
    """The checked ``encoder`` section of a 3D export: everything needed to rebuild the MONAI ViT."""

    arch: str
    in_chans: int
    img_size: tuple[int, int, int]
    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float
    cls_token: bool
    qkv_bias: bool
    layer_norm_eps: float
    spatial_dims: int = 3

    @property
    def mlp_dim(self) -> int:
        """Hidden width of the blocks' MLP (timm's ``int(embed_dim * mlp_ratio)``)."""
        return int(self.embed_dim * self.mlp_ratio)


def _bad(where: str, field: str, why: str) -> CardError:
    return CardError(f"{where}: field '{field}' {why}")


def _int(value: Any, where: str, field: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise _bad(where, field, f"must be an integer in [{lo}, {hi}], got {value!r}")
    return value


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


def _number(value: Any, where: str, field: str, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not (math.isfinite(value) and lo < value <= hi):
        raise _bad(where, field, f"must be a number in ({lo:g}, {hi:g}], got {value!r}")
    return float(value)


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


def _some(keys: Sequence[str], shown: int = 5) -> str:
    return f"[{', '.join(keys[:shown])}{f', ... ({len(keys)} in all)' if len(keys) > shown else ''}]"


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


def weights_path(export_dir: Path, card: dict[str, Any], where: str) -> Path:
    """The weights file named by the card, which must be a plain file inside ``export_dir``."""
    name = card.get("weights")
    if not isinstance(name, str) or not name or Path(name).name != name or name in (".", ".."):
        raise _bad(where, "weights", f"must be a file name inside the export folder, got {name!r}")
    path = Path(export_dir) / name
    root = Path(export_dir).resolve()
    if path.resolve().parent != root:
        raise _bad(where, "weights", f"{name!r} resolves outside the export folder")
    if not path.is_file():
        raise _bad(where, "weights", f"names {name!r}, which is not a file in the export folder")
    if path.stat().st_size > MAX_WEIGHTS_BYTES:
        raise _bad(where, "weights", f"{name!r} is larger than {MAX_WEIGHTS_BYTES} bytes")
    return path


_JSON_SPECIAL = re.compile(r'[\[\]{}"\\]')


def json_too_deep(text: str, limit: int = MAX_JSON_DEPTH) -> int | None:
    """Offset of the first bracket that nests deeper than ``limit`` (brackets inside strings do not
    count), or ``None``: a scan that needs no recursion, run before ``json.loads`` (which recurses)."""
    depth, in_string, skip = 0, False, -1
    for match in _JSON_SPECIAL.finditer(text):
        i = match.start()
        if i == skip:  # the character after a backslash inside a string
            continue
        c = text[i]
        if in_string:
            if c == "\\":
                skip = i + 1
            elif c == '"':
                in_string = False
        elif c == '"':
            in_string = True
        elif c in "[{":
            depth += 1
            if depth > limit:
                return i
        elif c in "]}":
            depth -= 1
    return None


def parse_json(text: str, where: str) -> Any:
    """``json.loads`` of an untrusted document: nesting beyond :data:`MAX_JSON_DEPTH` and every parse
    error (bad syntax, a 5,000-digit number) are one :class:`CardError` line."""
    deep = json_too_deep(text)
    if deep is not None:
        raise CardError(f"{where}: unreadable card (JSON nested deeper than {MAX_JSON_DEPTH} levels at offset {deep})")
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise CardError(f"{where}: unreadable card ({e.__class__.__name__}: {first})") from None


def check_depth(obj: Any, where: str, field: str, limit: int = MAX_JSON_DEPTH) -> None:
    """A record (dicts and lists) nests at most ``limit`` levels; walked without recursion."""
    stack = [(obj, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict | list | tuple):
            if depth > limit:
                raise _bad(where, field, f"nests deeper than {limit} levels")
            stack.extend((child, depth + 1) for child in (node.values() if isinstance(node, dict) else node))


def load_card(export_dir: str | Path) -> dict[str, Any]:
    """Read and validate ``encoder.json`` of an export folder; :class:`CardError` names the field.

    Checked: the JSON itself (size, nesting), ``format``, the ``encoder`` section (limits, allowed
    kwargs, the size of what it builds) and the weights path. The ``preprocessing`` section is checked
    where it is read (:func:`~medmae.export.preprocessing.preprocessing_from_card`).
    """
    export_dir = Path(export_dir)
    path = export_dir / CARD_NAME
    where = str(path)
    if not export_dir.is_dir():
        raise CardError(f"{export_dir}: not an export folder (expected a directory with {CARD_NAME})")
    try:
        if path.stat().st_size > MAX_CARD_BYTES:
            raise CardError(f"{where}: unreadable card (larger than {MAX_CARD_BYTES} bytes)")
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CardError(f"{where}: missing; export with `medmae export CKPT --out DIR`") from None
    except (OSError, UnicodeDecodeError) as e:
        raise CardError(f"{where}: unreadable card ({e.__class__.__name__}: {e})") from None
    card = parse_json(text, where)
    if not isinstance(card, dict):
        raise CardError(f"{where}: must hold a JSON object")
    if card.get("format") != CARD_FORMAT:
        raise _bad(where, "format", f"is {card.get('format')!r}, expected {CARD_FORMAT}")
    spec = check_encoder_section(card.get("encoder"), where)
    pre = card.get("preprocessing", {})
    if not isinstance(pre, dict):
        raise _bad(where, "preprocessing", "must be an object")
    if pre:  # an export without data has {} (nothing to rebuild); otherwise input and encoder must agree
        dims = pre.get("spatial_dims", 2)
        want = 3 if isinstance(spec, EncoderSpec3D) else 2
        if isinstance(dims, bool) or dims != want:
            raise _bad(
                where, "preprocessing.spatial_dims", f"is {dims!r} but encoder.arch {spec.arch!r} takes {want}D input"
            )
    weights_path(export_dir, card, where)
    return card


# ----------------------------------------------------------------------------- preprocessing values

#: where each preprocessing value sits in a card (fine-tuning records keep them flat: ``preprocessing.<name>``)
CARD_FIELDS = {
    "axis": "preprocessing.axis",
    "image_size": "preprocessing.image_size",
    "slice_offsets": "preprocessing.slice_offsets",
    "interpolation": "preprocessing.resize.interpolation",
    "antialias": "preprocessing.resize.antialias",
    "slice_spacing_mm": "preprocessing.slice_spacing_mm",
    "slice_interpolation": "preprocessing.slice_interpolation",
    "ct_windows": "preprocessing.intensity.ct.windows_level_width",
    "ct_window_mode": "preprocessing.intensity.ct.mode",
    "inference_window": "preprocessing.intensity.ct.inference_window",
    "percentiles": "preprocessing.intensity.other.percentiles",
    "size": "preprocessing.volume.size",
    "spacing_mm": "preprocessing.volume.spacing_mm",
}
RECORD_FIELDS = {name: f"preprocessing.{name}" for name in CARD_FIELDS}


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def check_intensity_values(v: Mapping[str, Any], where: str, names: Mapping[str, str]) -> dict[str, Any]:
    """``ct_windows``, ``ct_window_mode``, ``inference_window``, ``percentiles`` (2D and 3D): checked, as the
    keyword arguments of a preprocessor. ``names`` says how the record spells each field."""
    from medmae.data.cache import PERCENTILES

    windows = v["ct_windows"]
    if (
        not isinstance(windows, list | tuple)
        or not 1 <= len(windows) <= LIMITS["in_chans"]
        or not all(isinstance(w, list | tuple) and len(w) == 2 and all(_is_number(x) for x in w) for w in windows)
    ):
        raise _bad(where, names["ct_windows"], f"is malformed: must be 1 to {LIMITS['in_chans']} finite "
                   f"[level, width] pairs, got {_short(windows)}")  # fmt: skip
    ct_windows = tuple((float(lv), float(wd)) for lv, wd in windows)
    if any(not wd > 0 for _, wd in ct_windows):
        raise _bad(where, names["ct_windows"], "needs windows of width > 0")
    mode = v["ct_window_mode"]
    if mode not in ("random", "channels"):
        raise _bad(where, names["ct_window_mode"], f"must be random or channels, got {_short(mode)}")
    inference_window = v["inference_window"]
    if (
        isinstance(inference_window, bool)
        or not isinstance(inference_window, int)
        or not (0 <= inference_window < len(ct_windows))
    ):
        raise _bad(where, names["inference_window"], f"is out of range: {_short(inference_window)}")
    pcts = v["percentiles"]
    if (
        not isinstance(pcts, list | tuple)
        or len(pcts) != 2
        or not all(_is_number(p) and p in PERCENTILES for p in pcts)
        or not pcts[0] < pcts[1]
    ):
        raise _bad(where, names["percentiles"], f"must be two of {PERCENTILES}, low before high, got {_short(pcts)}")
    return {
        "ct_windows": ct_windows,
        "ct_window_mode": mode,
        "inference_window": inference_window,
        "percentiles": (float(pcts[0]), float(pcts[1])),
    }


def check_plane_values(v: Mapping[str, Any], where: str, names: Mapping[str, str]) -> dict[str, Any]:
    """Every value of a 2D / 2.5D preprocessing (``PlanePreprocessor``'s fields), checked and bounded:
    its keyword arguments. Optional fields are given by the caller (their defaults when absent)."""
    from medmae.data.index import AXES
    from medmae.data.neighbours import SLICE_INTERPOLATIONS
    from medmae.data.transforms import INTERPOLATIONS

    axis = v["axis"]
    if not isinstance(axis, str) or axis not in AXES:
        raise _bad(where, names["axis"], f"must be one of {tuple(AXES)}, got {_short(axis)}")
    size, side = v["image_size"], LIMITS["img_size"]
    if (
        not isinstance(size, list | tuple)
        or len(size) != 2
        or not all(isinstance(s, int) and not isinstance(s, bool) and 1 <= s <= side for s in size)
    ):
        raise _bad(where, names["image_size"], f"must be [height, width], each 1 to {side}, got {_short(size)}")
    offsets = v["slice_offsets"]
    if (
        not isinstance(offsets, list | tuple)
        or not 1 <= len(offsets) <= LIMITS["in_chans"]
        or not all(isinstance(o, int) and not isinstance(o, bool) and abs(o) <= side for o in offsets)
    ):
        raise _bad(where, names["slice_offsets"], f"must be a list of 1 to {LIMITS['in_chans']} ints, "
                   f"got {_short(offsets)}")  # fmt: skip
    interp = v["interpolation"]
    if interp not in INTERPOLATIONS:
        raise _bad(where, names["interpolation"], f"must be one of {INTERPOLATIONS}, got {_short(interp)}")
    if not isinstance(v["antialias"], bool):
        raise _bad(where, names["antialias"], f"must be true or false, got {_short(v['antialias'])}")
    spacing_mm = v["slice_spacing_mm"]
    if spacing_mm is not None and not (_is_number(spacing_mm) and spacing_mm > 0):
        raise _bad(where, names["slice_spacing_mm"],
                   f"must be null or a positive number of mm, got {_short(spacing_mm)}")  # fmt: skip
    slice_interp = v["slice_interpolation"]
    if slice_interp not in SLICE_INTERPOLATIONS:
        raise _bad(where, names["slice_interpolation"],
                   f"must be one of {SLICE_INTERPOLATIONS}, got {_short(slice_interp)}")  # fmt: skip
    intensity = check_intensity_values(v, where, names)
    per_slice = len(intensity["ct_windows"]) if intensity["ct_window_mode"] == "channels" else 1
    if len(offsets) * per_slice > LIMITS["in_chans"]:
        raise _bad(where, names["slice_offsets"], f"with the CT windows make {len(offsets) * per_slice} channels, "
                   f"more than {LIMITS['in_chans']}")  # fmt: skip
    return {
        "axis": axis,
        "image_size": (size[0], size[1]),
        "slice_offsets": tuple(offsets),
        "interpolation": interp,
        "antialias": v["antialias"],
        **intensity,
        "slice_spacing_mm": None if spacing_mm is None else float(spacing_mm),
        "slice_interpolation": slice_interp,
    }


def check_volume_values(v: Mapping[str, Any], where: str, names: Mapping[str, str]) -> dict[str, Any]:
    """Every value of a 3D preprocessing (``VolumePreprocessor``'s fields), checked and bounded."""
    size, side = v["size"], LIMITS["img_size"]
    if (
        not isinstance(size, list | tuple)
        or len(size) != 3
        or not all(isinstance(s, int) and not isinstance(s, bool) and 1 <= s <= side for s in size)
    ):
        raise _bad(where, names["size"], f"must be three ints [Z, Y, X], each 1 to {side}, got {_short(size)}")
    if math.prod(size) > LIMITS["voxels"]:
        raise _bad(where, names["size"], f"{list(size)} exceeds {LIMITS['voxels']} voxels per window")
    spacing = v["spacing_mm"]
    if not isinstance(spacing, list | tuple) or len(spacing) != 3 or not all(_is_number(s) for s in spacing):
        raise _bad(where, names["spacing_mm"], f"must be three numbers, got {_short(spacing)}")
    if not all(s > 0 for s in spacing):
        raise _bad(where, names["spacing_mm"], f"must be three finite numbers > 0 (mm), got {_short(spacing)}")
    return {
        "size": (size[0], size[1], size[2]),
        "spacing_mm": (float(spacing[0]), float(spacing[1]), float(spacing[2])),
        **check_intensity_values(v, where, names),
    }


def check_encoder_input(
    spec: EncoderSpec | EncoderSpec3D, size: Sequence[int], channels: int, where: str, field: str
) -> None:
    """The network built for an input of ``size`` (``preprocessing.image_size`` / ``volume.size``) and
    ``channels`` stays within the limits, and the channels are the encoder's."""
    if channels != spec.in_chans:
        raise CardError(f"{where}: preprocessing yields {channels} channel(s) but encoder.in_chans is {spec.in_chans}")
    _check_tokens(size, spec.patch_size, where, field)


def check_input_norm(norm: Any, channels: int, where: str) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """``input_norm`` of a record: null, or ``[mean, std]`` with one finite value per channel, std > 0."""
    if norm is None:
        return None
    if not isinstance(norm, list | tuple) or len(norm) != 2:
        raise _bad(where, "input_norm", f"must be null or [mean, std], got {_short(norm)}")
    mean, std = norm
    for name, values in (("mean", mean), ("std", std)):
        if not isinstance(values, list | tuple) or len(values) != channels or not all(_is_number(x) for x in values):
            raise _bad(where, f"input_norm.{name}", f"must be {channels} finite number(s), got {_short(values)}")
    if not all(s > 0 for s in std):
        raise _bad(where, "input_norm.std", f"must be > 0 for every channel, got {_short(std)}")
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def _short(value: Any, limit: int = 80) -> str:
    """``repr`` of an untrusted value, cut to one short line."""
    text = " ".join(_limited_repr(value).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _limited_repr(value: Any) -> str:
    import reprlib

    r = reprlib.Repr()
    r.maxlist = r.maxtuple = r.maxdict = 6
    r.maxstring = r.maxother = 60
    r.maxlevel = 3
    return r.repr(value)


# ----------------------------------------------------------------------------- fine-tuning checkpoint records

_REQUIRED = object()


def _value(d: Mapping[str, Any], key: str, where: str, section: str, default: Any) -> Any:
    if key in d:
        return d[key]
    if default is _REQUIRED:
        raise _bad(where, f"{section}.{key}" if section else key, "is missing")
    return default


def read_int(
    d: Mapping[str, Any],
    key: str,
    where: str,
    lo: int,
    hi: int,
    *,
    section: str = "hyper_parameters",
    default: Any = _REQUIRED,
) -> int:
    """An int field of an untrusted record in ``[lo, hi]``; :class:`CardError` names it."""
    return _int(_value(d, key, where, section, default), where, f"{section}.{key}", lo, hi)


def read_bool(d: Mapping[str, Any], key: str, where: str, *, section: str = "hyper_parameters",
              default: Any = _REQUIRED) -> bool:  # fmt: skip
    """A true/false field of an untrusted record; :class:`CardError` names it."""
    value = _value(d, key, where, section, default)
    if not isinstance(value, bool):
        raise _bad(where, f"{section}.{key}", f"must be true or false, got {_short(value)}")
    return value


def read_choice(d: Mapping[str, Any], key: str, where: str, choices: Sequence[str], *,
                section: str = "hyper_parameters", default: Any = _REQUIRED) -> str:  # fmt: skip
    """One of ``choices`` from an untrusted record; :class:`CardError` names the field."""
    value = _value(d, key, where, section, default)
    if not isinstance(value, str) or value not in choices:
        raise _bad(where, f"{section}.{key}", f"must be one of {tuple(choices)}, got {_short(value)}")
    return value


@dataclass(frozen=True)
class CheckedRecord:
    """The checked encoder record of a fine-tuning checkpoint (``EncoderSource.record()``)."""

    spec: EncoderSpec | EncoderSpec3D
    preprocessing: dict[str, Any]
    input_norm: tuple[tuple[float, ...], tuple[float, ...]] | None

    @property
    def spatial_dims(self) -> int:
        return 3 if isinstance(self.spec, EncoderSpec3D) else 2


#: fields of a 2D record's preprocessing that older checkpoints lack, and what their absence meant
PLANE_DEFAULTS = {"slice_spacing_mm": None, "slice_interpolation": "nearest"}


def check_finetune_record(record: Any, where: str) -> CheckedRecord:
    """Validate the encoder record a fine-tuning checkpoint keeps (``spatial_dims``, ``encoder``,
    ``preprocessing``, ``input_norm``) with the card's own checks and limits; :class:`CardError` names
    ``where`` (the checkpoint) and the field. Nothing is built."""
    if not isinstance(record, dict):
        raise CardError(f"{where}: the fine-tuning record must be a mapping, got {type(record).__name__}")
    check_depth(record, where, "record")
    dims = record.get("spatial_dims", 2)  # absent in checkpoints written before 3D: 2D
    if isinstance(dims, bool) or dims not in (2, 3):
        raise _bad(where, "spatial_dims", f"must be 2 or 3, got {_short(dims)}")
    enc = _value(record, "encoder", where, "", _REQUIRED)
    init = record.get("init")
    spec = check_encoder_section(enc, where, any_vit=isinstance(init, str) and init.startswith("timm:"))
    if (3 if isinstance(spec, EncoderSpec3D) else 2) != dims:
        raise _bad(where, "spatial_dims", f"is {dims} but encoder.arch {spec.arch!r} is not a {dims}D encoder")
    pre = _value(record, "preprocessing", where, "", _REQUIRED)
    if not isinstance(pre, dict):
        raise _bad(where, "preprocessing", f"must be a mapping, got {type(pre).__name__}")
    if dims == 3:
        keys = ("size", "spacing_mm", "ct_windows", "ct_window_mode", "inference_window", "percentiles")
        values = {k: _value(pre, k, where, "preprocessing", _REQUIRED) for k in keys}
        checked = check_volume_values(values, where, RECORD_FIELDS)
        size, channels = checked["size"], (len(checked["ct_windows"]) if checked["ct_window_mode"] == "channels" else 1)
        field = "preprocessing.size"
    else:
        keys = ("axis", "image_size", "slice_offsets", "interpolation", "antialias", "ct_windows", "ct_window_mode",
                "inference_window", "percentiles")  # fmt: skip
        values = {k: _value(pre, k, where, "preprocessing", _REQUIRED) for k in keys}
        values.update({k: pre.get(k, d) for k, d in PLANE_DEFAULTS.items()})
        checked = check_plane_values(values, where, RECORD_FIELDS)
        per_slice = len(checked["ct_windows"]) if checked["ct_window_mode"] == "channels" else 1
        size, channels = checked["image_size"], len(checked["slice_offsets"]) * per_slice
        field = "preprocessing.image_size"
    check_encoder_input(spec, size, channels, where, field)
    norm = check_input_norm(record.get("input_norm"), channels, where)
    if norm is not None and dims == 3:
        raise _bad(where, "input_norm", "must be null for a 3D encoder")
    return CheckedRecord(spec, checked, norm)


# ----------------------------------------------------------------------------- stored tensors against the record


def check_state_shapes(build: Any, state: Any, where: str, what: str) -> None:
    """Build ``build()`` on PyTorch's ``meta`` device (shapes only: no memory, no weights) and require
    ``state`` to hold exactly its tensors with exactly their shapes, and the network to stay within
    ``LIMITS['params']``; :class:`CardError` names ``where`` and the first difference. Run this before
    the real build, so a tampered record never allocates more than the checkpoint itself holds.

    ``what`` names the network in messages (e.g. ``"the recorded segmenter"``)."""
    import torch

    if not isinstance(state, Mapping) or not state:
        raise CardError(f"{where}: holds no weights for {what}")
    bad = [str(k)[:80] for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CardError(f"{where}: weights {_some(bad)} are not named tensors")
    try:
        with torch.device("meta"):
            net = build()
        expected = {k: tuple(v.shape) for k, v in net.state_dict().items()}
        params = sum(p.numel() for p in net.parameters())
    except Exception as e:  # noqa: BLE001 - a hostile record may make any constructor fail
        detail = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise CardError(f"{where}: {what} cannot be rebuilt ({e.__class__.__name__}: {detail})") from None
    if params > LIMITS["params"]:
        raise CardError(
            f"{where}: {what} has {params / 1e9:.3g}e9 parameters, more than {LIMITS['params'] / 1e9:.3g}e9"
        )
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = [f"missing {_some(missing)}"] * bool(missing) + [f"unexpected {_some(unexpected)}"] * bool(unexpected)
        raise CardError(f"{where}: weights do not fit {what}: {', '.join(parts)}")
    for key, want in expected.items():
        got = tuple(state[key].shape)
        if got != want:
            raise CardError(f"{where}: weights '{key}' have shape {list(got)} but {what} needs {list(want)}")
