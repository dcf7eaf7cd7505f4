"""Export the pretrained encoder (``encoder.safetensors`` + ``encoder.json`` card) and load it into timm.

The weights are exactly a timm VisionTransformer ``state_dict`` (``num_classes=0``), so downstream
code needs nothing from medmae to use them (the card-only rebuild, plain timm + safetensors)::

    card = json.load(open("encoder.json")); enc = card["encoder"]
    vit = timm.create_model(enc["arch"], num_classes=0, in_chans=enc["in_chans"],
                            img_size=enc["img_size"], **enc["kwargs"])
    vit.load_state_dict(safetensors.torch.load_file("encoder.safetensors"), strict=True)

or :func:`load_timm_encoder`, which also fits the weights to another input size or channel count,
switches to the MAE fine-tuning head (``global_pool="avg"``) and tells timm's data-config helpers the
true input. The card records the preprocessing used in pretraining (see
:func:`medmae.export.preprocessing_from_card`), the counts of the training data it saw
(``preprocessing.training_data``: series, slices, patients by modality, source and kind) and the
library ``versions``; it holds no paths, no ids and no patient information.
"""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from timm.models.vision_transformer import VisionTransformer

from medmae import __version__
from medmae.data.cache import write_json_atomic
from medmae.export.adapt import adapt_state_dict
from medmae.export.card import (
    CARD_FORMAT,
    CARD_NAME,
    WEIGHTS_NAME,
    CardError,
    EncoderSpec,
    EncoderSpec3D,
    check_depth,
    check_encoder_2d,
    check_encoder_section,
    check_state_shapes,
    check_weight_shapes,
    load_card,
    refuse_3d,
    weights_path,
)
from medmae.models import MaskedAutoencoder, MaskedAutoencoder3D, as_hw

MAE = MaskedAutoencoder | MaskedAutoencoder3D

#: timm arguments a caller may not pass: weights come from the export folder and nowhere else.
FORBIDDEN_OVERRIDES = ("pretrained", "checkpoint_path", "pretrained_cfg", "pretrained_cfg_overlay", "features_only")


#: how many key names an error message spells out before it only counts the rest
SHOWN_KEYS = 5


def name_keys(keys: Sequence[str]) -> str:
    """The first :data:`SHOWN_KEYS` of ``keys`` and how many there are: one readable error line even when
    every block of a deep encoder contributes a key."""
    shown = ", ".join(keys[:SHOWN_KEYS])
    return f"[{shown}, ... ({len(keys)} in all)]" if len(keys) > SHOWN_KEYS else f"[{shown}]"


class CheckpointError(ValueError):
    """A file given to ``medmae export`` is not a loadable medmae pretraining checkpoint."""


def versions() -> dict[str, str]:
    """Library versions that produced an export (provenance for whoever loads it)."""
    return {"medmae": __version__, "timm": timm.__version__, "torch": torch.__version__.split("+")[0]}


def encoder_card(
    model: MAE, preprocessing: dict[str, Any] | None, training: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The JSON card describing an exported encoder."""
    return {
        "format": CARD_FORMAT,
        "producer": f"medmae {__version__}",
        "versions": versions(),
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
    model: MAE,
    out_dir: Path,
    preprocessing: dict[str, Any] | None = None,
    training: dict[str, Any] | None = None,
) -> Path:
    """Write weights + card into ``out_dir``; returns the weights path.

    2D: the timm ViT ``state_dict``; 3D (:class:`MaskedAutoencoder3D`): the ``ViTEncoder3D`` one (timm
    names, ``Conv3d`` patch embedding), card ``encoder`` = ``model.encoder_config()``.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"--out {out_dir} is a file, not a directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.encoder.state_dict().items()}
    weights = out_dir / WEIGHTS_NAME
    # one metadata entry only: safetensors keeps the map unordered, so a second key (the producer, which
    # the card states) made two exports of the same weights differ in their header bytes
    save_file(state, str(weights), metadata={"format": "pt"})
    write_json_atomic(out_dir / CARD_NAME, encoder_card(model, preprocessing, training))
    return weights


def read_checkpoint(ckpt_path: Path) -> dict[str, Any]:
    """Load a pretraining checkpoint once, safely (``weights_only``: no code in the file can run)."""
    ckpt_path = Path(ckpt_path)
    if not ckpt_path.is_file():
        raise CheckpointError(f"{ckpt_path}: checkpoint not found")
    try:
        ckpt = torch.load(str(ckpt_path), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, RuntimeError, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
        raise CheckpointError(f"{ckpt_path}: not a loadable medmae checkpoint ({first[:200]})") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise CheckpointError(f"{ckpt_path}: not a Lightning checkpoint (no 'state_dict')")
    if not isinstance(ckpt.get("hyper_parameters"), dict) or "variant" not in ckpt["hyper_parameters"]:
        raise CheckpointError(f"{ckpt_path}: not a medmae pretraining checkpoint (no MAE 'hyper_parameters')")
    return ckpt


def export_checkpoint(ckpt_path: Path, out_dir: Path) -> Path:
    """Export the encoder of a pretraining checkpoint written by ``medmae fit`` / ``medmae demo`` (2D or 3D:
    ``MAEPretrainModule`` rebuilds whichever MAE the checkpoint's ``variant`` names)."""
    from medmae.train.module import MAEPretrainModule

    ckpt = read_checkpoint(ckpt_path)
    # old flat or new grouped hyper-parameters, LightningCLI's private entries (``_instantiator``) left out
    hparams = ckpt["hyper_parameters"]
    try:  # shapes first, on the meta device: hostile hyper-parameters never allocate the model they describe
        check_state_shapes(
            lambda: MAEPretrainModule.from_hparams(hparams), ckpt["state_dict"], str(ckpt_path), "the checkpoint's MAE"
        )
    except CardError as e:
        raise CheckpointError(str(e)) from None
    try:
        module = MAEPretrainModule.from_hparams(hparams)
        module.load_state_dict(ckpt["state_dict"], strict=True)
    except (TypeError, ValueError, RuntimeError) as e:
        detail = str(e).splitlines()[0][:200] if str(e) else e.__class__.__name__
        raise CheckpointError(f"{ckpt_path}: checkpoint does not rebuild its MAE ({detail})") from None
    extra = ckpt.get("medmae", {}) if isinstance(ckpt.get("medmae"), dict) else {}
    preprocessing = extra.get("preprocessing")
    training = {}
    for key in ("global_step", "epoch"):
        value = ckpt.get(key, 0)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**63:
            raise CheckpointError(f"{ckpt_path}: field '{key}' must be a non-negative int, got {str(value)[:40]!r}")
        training[key] = value
    if preprocessing:  # the card must be one every loader accepts: the same checks as reading it back
        from medmae.export.preprocessing import preprocessing_from_card

        where = f"{ckpt_path}: medmae record"
        try:
            check_depth(preprocessing, where, "preprocessing")
            if not isinstance(preprocessing, dict):
                raise CardError(f"{where}: field 'preprocessing' must be a mapping")
            pre = preprocessing_from_card({"preprocessing": preprocessing}, where)
            want = 3 if isinstance(module.model, MaskedAutoencoder3D) else 2
            if pre.spatial_dims != want:
                raise CardError(
                    f"{where}: field 'preprocessing.spatial_dims' is {pre.spatial_dims}; the MAE is {want}D"
                )
        except CardError as e:
            raise CheckpointError(str(e)) from None
    return export_encoder(module.model, out_dir, preprocessing, training)


# ----------------------------------------------------------------------------- loading


def read_encoder_weights(export_dir: Path, card: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The exported ``state_dict`` (safetensors: no code runs), checked finite; errors name the file.

    The tensor shapes are read from the safetensors header first and compared with the encoder the
    card describes (:func:`~medmae.export.card.check_weight_shapes`, 2D), before anything is loaded
    or any model is built."""
    where = str(Path(export_dir) / CARD_NAME)
    path = weights_path(Path(export_dir), card, where)
    spec = check_encoder_section(card.get("encoder"), where)
    try:
        with safe_open(str(path), framework="pt") as f:
            shapes = {name: f.get_slice(name).get_shape() for name in f.keys()}  # noqa: SIM118 - not a dict
    except (SafetensorError, OSError, ValueError) as e:
        raise CardError(f"{path}: unreadable safetensors file ({e})") from None
    check_weight_shapes(spec, shapes, where)
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CardError(f"{path}: unreadable safetensors file ({e})") from None
    for name, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CardError(f"{path}: tensor '{name}' holds NaN or Inf values")
    return state


def _pretrained_cfg(in_chans: int, img_size: tuple[int, int], card: dict[str, Any]) -> dict[str, Any]:
    """What timm's ``resolve_model_data_config`` should report: the true input, values in [0, 1] as is."""
    resize = card.get("preprocessing", {}).get("resize", {})
    interpolation = resize.get("interpolation", "bilinear") if isinstance(resize, dict) else "bilinear"
    return {
        "input_size": (in_chans, *img_size),
        "mean": (0.0,) * in_chans,
        "std": (1.0,) * in_chans,
        "interpolation": interpolation if interpolation in ("bilinear", "bicubic") else "bilinear",
        "crop_pct": 1.0,
        "crop_mode": "center",
        "num_classes": 0,
    }


def create_timm_encoder(spec: EncoderSpec, card: dict[str, Any], **overrides: Any) -> VisionTransformer:
    """``timm.create_model`` of the card's encoder with the caller's overrides winning (no weights)."""
    if isinstance(spec, EncoderSpec3D):
        raise refuse_3d(spec.arch, "timm (load_timm_encoder / finetune-cls / the light decoder)")
    bad = sorted(set(overrides) & set(FORBIDDEN_OVERRIDES))
    if bad:
        raise ValueError(f"load_timm_encoder: {bad} cannot be overridden; weights come from the export folder")
    kwargs: dict[str, Any] = {"num_classes": 0, **spec.kwargs, "in_chans": spec.in_chans, "img_size": spec.img_size}
    kwargs.update(overrides)
    kwargs["img_size"] = as_hw(kwargs["img_size"])
    in_chans = kwargs["in_chans"]
    if isinstance(in_chans, bool) or not isinstance(in_chans, int) or in_chans < 1:
        raise ValueError(f"load_timm_encoder: in_chans must be an int >= 1, got {in_chans!r}")
    patch = int(kwargs.get("patch_size", spec.patch_size))
    if any(s % patch for s in kwargs["img_size"]):
        raise ValueError(f"load_timm_encoder: img_size {list(kwargs['img_size'])} is not a multiple of patch {patch}")
    cfg = _pretrained_cfg(in_chans, kwargs["img_size"], card)
    try:
        vit = timm.create_model(spec.arch, pretrained=False, pretrained_cfg_overlay=cfg, **kwargs)
    except (TypeError, AssertionError) as e:
        raise ValueError(f"load_timm_encoder: cannot build {spec.arch} with {overrides}: {e}") from None
    if not isinstance(vit, VisionTransformer):
        raise ValueError(f"load_timm_encoder: {spec.arch} with {overrides} is not a VisionTransformer")
    return vit


def load_timm_encoder(export_dir: str | Path, **overrides: Any) -> VisionTransformer:
    """Build the card's timm ViT and load the exported weights, fitted to the caller's overrides.

    ``overrides`` go to ``timm.create_model`` and win over the card (e.g. ``num_classes=2``,
    ``drop_path_rate=0.1``, ``img_size=128``, ``in_chans=3``, ``global_pool="avg"``):

    * a new ``img_size`` resamples the position embeddings (timm's ``resample_abs_pos_embed``);
    * a new ``in_chans`` adapts the patch embedding by the equal-channel rule (``adapt.py``);
    * ``global_pool="avg"`` is the MAE fine-tuning recipe: the encoder's final ``norm`` is dropped
      and a fresh ``fc_norm`` normalises the averaged patch tokens;
    * a classification head (``num_classes > 0``) stays freshly initialised.

    Every other weight is loaded exactly; anything that does not fit raises ``ValueError`` naming
    the keys. ``pretrained_cfg`` reports the real input (channels, size, mean 0 / std 1).
    """
    card = load_card(export_dir)
    spec = check_encoder_2d(card["encoder"], str(Path(export_dir) / CARD_NAME), "load_timm_encoder")
    state = read_encoder_weights(Path(export_dir), card)
    return timm_from_encoder(spec, state, card, **overrides)


def timm_from_encoder(
    spec: EncoderSpec, state: dict[str, torch.Tensor] | None, card: dict[str, Any] | None = None, **overrides: Any
) -> VisionTransformer:
    """:func:`load_timm_encoder` from an encoder spec and ``state_dict`` (``None``: timm's random init)."""
    vit = create_timm_encoder(spec, card or {}, **overrides)
    if state is None:
        return vit
    if "pos_embed" not in state or "patch_embed.proj.weight" not in state:
        raise CardError(f"{spec.arch}: weights are not a timm ViT state_dict (no pos_embed/patch_embed)")
    old_grid = (spec.img_size[0] // spec.patch_size, spec.img_size[1] // spec.patch_size)
    state = adapt_state_dict(
        state, old_grid=old_grid, new_grid=tuple(vit.patch_embed.grid_size), in_chans=vit.patch_embed.proj.in_channels
    )
    fresh = ("head.",)
    if isinstance(vit.norm, torch.nn.Identity):  # avg pooling with fc_norm: MAE fine-tuning drops `norm`
        state = {k: v for k, v in state.items() if not k.startswith("norm.")}
        fresh += ("fc_norm.",)
    try:
        missing, unexpected = vit.load_state_dict(state, strict=False)
    except RuntimeError as e:
        sizes = "; ".join(line.strip() for line in str(e).splitlines()[1:4])
        raise ValueError(f"exported encoder does not match {spec.arch} with {overrides}: {sizes}") from None
    not_fresh = [k for k in missing if not k.startswith(fresh)]
    if unexpected or not_fresh:
        raise ValueError(
            f"exported encoder does not match {spec.arch} with {overrides}: "
            f"missing {name_keys(not_fresh)}, unexpected {name_keys(unexpected)}"
        )
    return vit


__all__ = [
    "CARD_NAME",
    "CheckpointError",
    "WEIGHTS_NAME",
    "create_timm_encoder",
    "encoder_card",
    "export_checkpoint",
    "export_encoder",
    "load_card",
    "load_timm_encoder",
    "read_checkpoint",
    "read_encoder_weights",
    "timm_from_encoder",
]
