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
This module (with the ``card_*`` modules it imports) is the one validator of every record medmae
reads back from disk: the card (its JSON is parsed only after a scan has shown it nests at most
:data:`MAX_JSON_DEPTH` levels, so a 200,000-deep file is a one-line error, not a ``RecursionError``),
and the record a fine-tuning checkpoint carries (:func:`check_finetune_record`: the same encoder and
preprocessing checks on the checkpoint's layout, the input normalisation, and the hyper-parameters
through :func:`read_int` / :func:`read_bool` / :func:`read_choice`). :data:`LIMITS` bounds every size
a record can ask for (sides, tokens, voxels, parameters, classes, decoder width) so no allocation
follows from a hostile number, and :func:`check_weight_shapes` compares the stored tensors with the
encoder the record describes (built on PyTorch's ``meta`` device: shapes only, no memory) before any
real model is built.

Modules
-------
This module is the card's one import point and its loader (:func:`load_card`, :func:`weights_path`);
the checks live by concern in :mod:`~medmae.export.card_types` (names, limits, :class:`CardError`, the
encoder specs), :mod:`~medmae.export.card_untrusted` (bad-field errors, JSON depth, typed field
readers), :mod:`~medmae.export.card_encoder` (the ``encoder`` section, meta-device builds, weight
shapes), :mod:`~medmae.export.card_values` (preprocessing values) and
:mod:`~medmae.export.card_records` (fine-tuning records, stored tensors). Their public names are all
importable from here (``__all__``), as before the split (issue 19): import them from here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medmae.export.card_encoder import (
    check_encoder_2d,
    check_encoder_input,
    check_encoder_section,
    check_encoder_section_3d,
    check_weight_shapes,
    is_3d_encoder,
    meta_encoder,
    refuse_3d,
)
from medmae.export.card_records import PLANE_DEFAULTS, CheckedRecord, check_finetune_record, check_state_shapes
from medmae.export.card_types import (
    ARCH_3D,
    CARD_FORMAT,
    CARD_NAME,
    ENCODER_KWARGS,
    LIMITS,
    LOADERS_3D,
    MAX_CARD_BYTES,
    MAX_JSON_DEPTH,
    MAX_WEIGHTS_BYTES,
    WEIGHTS_NAME,
    CardError,
    EncoderSpec,
    EncoderSpec3D,
)
from medmae.export.card_untrusted import _bad, check_depth, json_too_deep, parse_json, read_bool, read_choice, read_int
from medmae.export.card_values import (
    CARD_FIELDS,
    RECORD_FIELDS,
    check_input_norm,
    check_intensity_values,
    check_plane_values,
    check_volume_values,
)

__all__ = [
    "ARCH_3D",
    "CARD_FIELDS",
    "CARD_FORMAT",
    "CARD_NAME",
    "ENCODER_KWARGS",
    "LIMITS",
    "LOADERS_3D",
    "MAX_CARD_BYTES",
    "MAX_JSON_DEPTH",
    "MAX_WEIGHTS_BYTES",
    "PLANE_DEFAULTS",
    "RECORD_FIELDS",
    "WEIGHTS_NAME",
    "CardError",
    "CheckedRecord",
    "EncoderSpec",
    "EncoderSpec3D",
    "check_depth",
    "check_encoder_2d",
    "check_encoder_input",
    "check_encoder_section",
    "check_encoder_section_3d",
    "check_finetune_record",
    "check_input_norm",
    "check_intensity_values",
    "check_plane_values",
    "check_state_shapes",
    "check_volume_values",
    "check_weight_shapes",
    "is_3d_encoder",
    "json_too_deep",
    "load_card",
    "meta_encoder",
    "parse_json",
    "read_bool",
    "read_choice",
    "read_int",
    "refuse_3d",
    "weights_path",
]


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
