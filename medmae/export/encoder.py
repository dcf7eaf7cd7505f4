"""Export the pretrained encoder: ``encoder.safetensors`` + a self-describing ``encoder.json`` card.

The weights are exactly a timm VisionTransformer ``state_dict`` (``num_classes=0``), so downstream
code needs nothing from medmae to use them::

    card = json.load(open("encoder.json"))
    vit = timm.create_model(card["encoder"]["arch"], num_classes=0, in_chans=card["encoder"]["in_chans"],
                            img_size=card["encoder"]["img_size"], **card["encoder"]["kwargs"])
    vit.load_state_dict(safetensors.torch.load_file("encoder.safetensors"), strict=True)

or simply :func:`load_timm_encoder`. The card also records the preprocessing used in pretraining
(axis, slices, intensity windows, crop) so fine-tuning can feed the encoder what it learned on. It
holds no paths and no patient information.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors.torch import load_file, save_file

from medmae import __version__
from medmae.data.cache import write_json_atomic
from medmae.models import MaskedAutoencoder

CARD_FORMAT = 1
WEIGHTS_NAME = "encoder.safetensors"
CARD_NAME = "encoder.json"


def encoder_card(
    model: MaskedAutoencoder, preprocessing: dict[str, Any] | None, training: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The JSON card describing an exported encoder."""
    return {
        "format": CARD_FORMAT,
        "producer": f"medmae {__version__}",
        "weights": WEIGHTS_NAME,
        "encoder": model.encoder_config(),
        "pretraining": {
            "method": "mae",
            "mask_ratio": model.mask_ratio,
            "norm_pix_loss": model.norm_pix_loss,
            **(training or {}),
        },
        "preprocessing": preprocessing or {},
    }


def export_encoder(
    model: MaskedAutoencoder,
    out_dir: Path,
    preprocessing: dict[str, Any] | None = None,
    training: dict[str, Any] | None = None,
) -> Path:
    """Write weights + card into ``out_dir``; returns the weights path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.encoder.state_dict().items()}
    weights = out_dir / WEIGHTS_NAME
    save_file(state, str(weights), metadata={"format": "pt", "producer": f"medmae {__version__}"})
    write_json_atomic(out_dir / CARD_NAME, encoder_card(model, preprocessing, training))
    return weights


def export_checkpoint(ckpt_path: Path, out_dir: Path) -> Path:
    """Export the encoder of a pretraining checkpoint written by ``medmae fit`` / ``medmae demo``."""
    from medmae.train.module import MAEPretrainModule

    module = MAEPretrainModule.load_from_checkpoint(str(ckpt_path), map_location="cpu")
    ckpt = torch.load(str(ckpt_path), map_location="cpu", weights_only=False)
    extra = ckpt.get("medmae", {})
    training = {"global_step": int(ckpt.get("global_step", 0)), "epoch": int(ckpt.get("epoch", 0))}
    return export_encoder(module.model, out_dir, extra.get("preprocessing"), training)


def load_card(export_dir: Path) -> dict[str, Any]:
    card = json.loads((Path(export_dir) / CARD_NAME).read_text(encoding="utf-8"))
    if card.get("format") != CARD_FORMAT:
        raise ValueError(f"{CARD_NAME}: field 'format' is {card.get('format')!r}, expected {CARD_FORMAT}")
    return card


def load_timm_encoder(export_dir: Path, **timm_kwargs: Any) -> torch.nn.Module:
    """Build the timm ViT described by the card and load the exported weights strictly.

    ``timm_kwargs`` (e.g. ``num_classes=2``, ``drop_path_rate=0.1``) go to ``timm.create_model``;
    a new classification head stays freshly initialised.
    """
    card = load_card(export_dir)
    enc = card["encoder"]
    kwargs = {"num_classes": 0, **enc["kwargs"], **timm_kwargs}
    vit = timm.create_model(enc["arch"], pretrained=False, in_chans=enc["in_chans"], img_size=enc["img_size"], **kwargs)
    state = load_file(str(Path(export_dir) / card["weights"]))
    missing, unexpected = vit.load_state_dict(state, strict=False)
    head_only = all(k.startswith("head.") for k in missing)
    if unexpected or not head_only:
        raise ValueError(f"exported encoder does not match {enc['arch']}: missing {missing}, unexpected {unexpected}")
    return vit
