"""The MAE's architecture and masking options, one validated frozen dataclass: :class:`MAEOptions`.

It is the one list of what a named variant can be changed by (sizes, masking, loss), written once:
:func:`medmae.models.build_mae` takes it for 2D and 3D variants alike, ``create_mae`` /
``create_mae3d`` build one from their keyword arguments, and the pretraining module takes it as
``model.mae`` (YAML ``model: {variant: ..., mae: {depth: 4, mask_ratio: 0.75, ...}}``).

Every field is checked in ``__post_init__``; a bad value raises a one-line ``ValueError`` that names
the field as a config key (``model.mae.depth must be an int in [1, 256], got 0``). Sizes that depend on
each other or on the variant (a width divisible by the heads, an image a multiple of the patch) are
checked by the model that is built from them.

Example::

    opts = MAEOptions(img_size=64, patch_size=8, depth=4, decoder_embed_dim=128, decoder_depth=2)
    model = build_mae("mae_vit_tiny_patch16", opts)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

#: largest width / head count / patch accepted (ViT-22B is 6144 wide): beyond it a typo, not a model
MAX_WIDTH = 8192
#: largest number of transformer blocks accepted in the encoder or decoder
MAX_DEPTH = 256
#: largest MLP ratio accepted
MAX_MLP_RATIO = 64

#: how errors name an :class:`MAEOptions` field (its place in the pretraining config)
FIELD_PREFIX = "model.mae"


@dataclass(frozen=True)
class MAEOptions:
    """Architecture and masking of a named MAE variant (``None``: the variant's own size).

    Args:
        in_chans: input channels (1 grayscale; k for 2.5D); must equal the data's channels.
        img_size: 2D ``H`` or ``[H, W]``; 3D ``S`` or ``[Z, Y, X]``; must equal the data's sample
            size (``data.img_size`` / ``data.volume.size``); multiples of the patch size.
        mask_ratio: fraction of patches masked per sample, in [0, 1).
        norm_pix_loss: regress per-patch normalised pixels.
        embed_dim, depth, num_heads, mlp_ratio, patch_size: encoder size overrides (None = the
            variant's; a 3D variant's MLP ratio is 4 unless set).
        drop_path_rate: stochastic depth in the encoder, in [0, 1).
        decoder_embed_dim, decoder_depth, decoder_num_heads, decoder_mlp_ratio: decoder size (the MAE
            paper's 512 wide, 8 deep, 16 heads by default, 2D and 3D alike).
        hog_weight: weight of a HOG target beside the pixels (MaskFeat's masked-feature target, one more
            linear head on the decoder; :mod:`medmae.models.hog`); 0 = pixels only. 2D, patch a multiple of 8.
    """

    in_chans: int = 1
    img_size: int | tuple[int, int] | tuple[int, int, int] = 224
    mask_ratio: float = 0.75
    norm_pix_loss: bool = True
    embed_dim: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    mlp_ratio: float | None = None
    patch_size: int | None = None
    drop_path_rate: float = 0.0
    decoder_embed_dim: int = 512
    decoder_depth: int = 8
    decoder_num_heads: int = 16
    decoder_mlp_ratio: float = 4.0
    hog_weight: float = 0.0

    def __post_init__(self) -> None:
        for name, limit in (("in_chans", MAX_WIDTH), ("decoder_embed_dim", MAX_WIDTH), ("decoder_num_heads", MAX_WIDTH),
                            ("decoder_depth", MAX_DEPTH)):  # fmt: skip
            _check_int(name, getattr(self, name), limit)
        for name, limit in (("embed_dim", MAX_WIDTH), ("num_heads", MAX_WIDTH), ("patch_size", MAX_WIDTH),
                            ("depth", MAX_DEPTH)):  # fmt: skip
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), limit)
        for name in ("mlp_ratio", "decoder_mlp_ratio"):
            ratio = getattr(self, name)
            if ratio is not None and (not _is_number(ratio) or not 0 < ratio <= MAX_MLP_RATIO):
                _fail(name, f"a number in (0, {MAX_MLP_RATIO}]", ratio)
        if not _is_number(self.mask_ratio) or not 0 <= self.mask_ratio < 1:
            _fail("mask_ratio", "a number in [0, 1)", self.mask_ratio)
        if not _is_number(self.drop_path_rate) or not 0 <= self.drop_path_rate < 1:
            _fail("drop_path_rate", "a number in [0, 1)", self.drop_path_rate)
        if not _is_number(self.hog_weight) or not 0 <= self.hog_weight <= 100:
            _fail("hog_weight", "a number in [0, 100]", self.hog_weight)
        if not isinstance(self.norm_pix_loss, bool):
            _fail("norm_pix_loss", "true or false", self.norm_pix_loss)
        size = self.img_size
        if isinstance(size, list | tuple):
            if len(size) not in (2, 3) or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in size):
                _fail("img_size", "a positive int, [H, W] (2D) or [Z, Y, X] (3D)", size)
            object.__setattr__(self, "img_size", tuple(size))  # YAML lists: one hashable, comparable form
        elif isinstance(size, bool) or not isinstance(size, int) or size < 1:
            _fail("img_size", "a positive int, [H, W] (2D) or [Z, Y, X] (3D)", size)

    @classmethod
    def of(cls, value: MAEOptions | Mapping[str, Any] | None = None, **overrides: Any) -> MAEOptions:
        """``value`` (options, a mapping of fields as read from YAML / a checkpoint, or None: defaults)
        with ``overrides``; an unknown field is a ``ValueError`` naming it."""
        if value is None:
            value = cls()
        elif isinstance(value, Mapping):
            value = cls(**_known(cls, dict(value)))
        elif not isinstance(value, cls):
            raise ValueError(f"{FIELD_PREFIX} must be a mapping of MAE options, got {type(value).__name__}")
        return replace(value, **_known(cls, overrides)) if overrides else value

    def to_dict(self) -> dict[str, Any]:
        """Plain fields (lists for sizes): what a checkpoint and a YAML config hold."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def _known(cls: type, kwargs: dict[str, Any], prefix: str = FIELD_PREFIX) -> dict[str, Any]:
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(kwargs) - names)
    if unknown:
        raise ValueError(f"{prefix}.{unknown[0]} is not an option; choose from {sorted(names)}")
    return kwargs


def _is_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | float)


def _check_int(name: str, value: Any, limit: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
        _fail(name, f"an int in [1, {limit}]", value)


def _fail(name: str, what: str, value: Any) -> None:
    raise ValueError(f"{FIELD_PREFIX}.{name} must be {what}, got {value!r}")
