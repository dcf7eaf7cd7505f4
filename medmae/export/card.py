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


def _bad(where: str, field: str, why: str) -> CardError:
    return CardError(f"{where}: field '{field}' {why}")


def _int(value: Any, where: str, field: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise _bad(where, field, f"must be an integer in [{lo}, {hi}], got {value!r}")
    return value


def check_encoder_section(enc: Any, where: str) -> EncoderSpec:
    """Validate the ``encoder`` section of a card (types, limits, allowed kwargs)."""
    import timm

    if not isinstance(enc, dict):
        raise _bad(where, "encoder", f"must be an object, got {type(enc).__name__}")
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
    size = enc["img_size"]
    if not isinstance(size, list | tuple) or len(size) != 2:
        raise _bad(where, "encoder.img_size", f"must be [height, width], got {size!r}")
    img_size = tuple(_int(s, where, "encoder.img_size", 1, LIMITS["img_size"]) for s in size)
    patch = _int(enc["patch_size"], where, "encoder.patch_size", 1, LIMITS["patch_size"])
    if any(s % patch for s in img_size):
        raise _bad(where, "encoder.img_size", f"{list(img_size)} is not a multiple of patch_size {patch}")
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
    check_encoder_section(card.get("encoder"), where)
    if not isinstance(card.get("preprocessing", {}), dict):
        raise _bad(where, "preprocessing", "must be an object")
    weights_path(export_dir, card, where)
    return card
