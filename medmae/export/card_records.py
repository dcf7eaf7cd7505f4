"""The encoder record a fine-tuning checkpoint keeps, checked with the card's own checks and limits,
and the stored tensors of a checkpoint compared with the network its record describes (built on
PyTorch's ``meta`` device) before any real model is built.

Split out of :mod:`medmae.export.card` (issue 19): what the fine-tuning side reads back from its own
checkpoints, on top of the card checks. Import the public names from :mod:`medmae.export.card`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from medmae.export.card_encoder import check_encoder_input, check_encoder_section
from medmae.export.card_types import LIMITS, CardError, EncoderSpec, EncoderSpec3D
from medmae.export.card_untrusted import _REQUIRED, _bad, _short, _some, _value, check_depth
from medmae.export.card_values import RECORD_FIELDS, check_input_norm, check_plane_values, check_volume_values


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
