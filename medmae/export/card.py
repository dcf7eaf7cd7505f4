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
"""

from __future__ import annotations

import json
import math
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
#: Sanity limits: a card beyond them is corrupt or hostile, not a real encoder.
LIMITS = {"in_chans": 64, "img_size": 4096, "patch_size": 64, "embed_dim": 8192, "depth": 256, "num_heads": 256}
#: Largest weights file a card may point at (a ViT-Giant is ~4 GB in fp32).
MAX_WEIGHTS_BYTES = 16 * 1024**3


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


def check_encoder_section(enc: Any, where: str) -> EncoderSpec | EncoderSpec3D:
    """Validate the ``encoder`` section of a card (types, limits, allowed kwargs); 2D or 3D."""
    if not isinstance(enc, dict):
        raise _bad(where, "encoder", f"must be an object, got {type(enc).__name__}")
    if is_3d_encoder(enc):
        return check_encoder_section_3d(enc, where)
    return _check_encoder_section_2d(enc, where)


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
    patch = _int(enc["patch_size"], where, "encoder.patch_size", 1, LIMITS["patch_size"])
    if any(s % patch for s in img_size):
        raise _bad(where, "encoder.img_size", f"{list(img_size)} is not a multiple of patch_size {patch}")
    return img_size, patch


def _check_encoder_section_2d(enc: dict[str, Any], where: str) -> EncoderSpec:
    import timm

    for key in ("arch", "kwargs", "in_chans", "img_size", "patch_size", "embed_dim"):
        if key not in enc:
            raise _bad(where, f"encoder.{key}", "is missing")
    arch = enc["arch"]
    if not isinstance(arch, str) or not arch.startswith("vit_") or not timm.is_model(arch):
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
    return EncoderSpec(arch, dict(kwargs), in_chans, img_size, patch, embed_dim)  # type: ignore[arg-type]


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


def load_card(export_dir: str | Path) -> dict[str, Any]:
    """Read and validate ``encoder.json`` of an export folder; :class:`CardError` names the field."""
    export_dir = Path(export_dir)
    path = export_dir / CARD_NAME
    where = str(path)
    if not export_dir.is_dir():
        raise CardError(f"{export_dir}: not an export folder (expected a directory with {CARD_NAME})")
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CardError(f"{where}: missing; export with `medmae export CKPT --out DIR`") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CardError(f"{where}: unreadable card ({e.__class__.__name__}: {e})") from None
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
