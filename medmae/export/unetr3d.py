"""A pretrained 3D MAE encoder inside MONAI ``ViT(spatial_dims=3)`` and ``UNETR(spatial_dims=3)``.

:class:`~medmae.models.mae3d.ViTEncoder3D` names its parameters as timm does, so the 2D key map
(:func:`medmae.export.unetr.timm_to_monai_vit`) renames it: ``patch_embed.proj`` (a ``Conv3d``) ->
``patch_embedding.patch_embeddings``, ``pos_embed`` -> ``patch_embedding.position_embeddings``,
``blocks.i.attn.proj`` -> ``blocks.i.attn.out_proj``, ``blocks.i.mlp.fc1/fc2`` -> ``mlp.linear1/linear2``.

What differs from 2D, and why:

- No LayerNorm patching: the 3D encoder uses ``eps=1e-5``, MONAI's default.
- Positions are fixed sin-cos in MONAI's own layout, so for a fine-tuning size other than the
  pretraining crop they are *recomputed* for the new grid (exact) instead of interpolated.
- Unused tensors: as in 2D, every encoder tensor must be consumed by the map or be in
  :data:`~medmae.export.unetr.UNUSED_ENCODER_KEYS` (a ``ValueError`` names any other, e.g. LayerScale
  ``blocks.i.ls1.gamma``). ``pos_embed`` is the fixed sin-cos function, recomputed rather than read;
  :func:`check_weights3d` refuses an export whose positions are anything else.
- Class token: an encoder pretrained with one (the default) goes into :class:`EncoderUNETR` / a ViT
  given a ``cls_token`` attribute (MONAI's forward prepends it when present; ``pos_embed[:, 0]`` is
  zero, so the token is copied as is); one pretrained with ``cls_token=False`` loads into a stock
  MONAI ``UNETR``/``ViT(classification=False)``. Either way every hidden state MONAI returns equals
  the encoder's block output (tested within 1e-5).

From an export folder (``medmae export`` of a 3D checkpoint): :func:`build_unetr3d_from_export` and
:func:`load_vit3d` read the card (:class:`~medmae.export.card.EncoderSpec3D`), check the weights
against it, and build the same networks; ``load_weights=False`` gives the same network with MONAI's
random initialisation (the baseline of a transfer comparison: learnable positions drawn by MONAI,
a class token drawn N(0, 0.02)).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from monai.networks.nets import UNETR, ViT
from torch import nn

from medmae.export.card import CARD_NAME, CardError, EncoderSpec, EncoderSpec3D, check_encoder_section, load_card
from medmae.export.encoder import read_encoder_weights
from medmae.export.unetr import UNETR_HIDDEN_STATES, UNETR_PATCH, load_mapped_vit, monai_unetr, timm_to_monai_vit
from medmae.models.mae3d import MaskedAutoencoder3D, ViTEncoder3D, as_size3d, grid_shape3d
from medmae.models.pos_embed3d import sincos_pos_embed_3d

EncoderLike = MaskedAutoencoder3D | ViTEncoder3D | Mapping[str, torch.Tensor]


def monai_vit3d_state(encoder_state: Mapping[str, torch.Tensor], where: str = "encoder") -> dict[str, torch.Tensor]:
    """Rename a :class:`ViTEncoder3D` ``state_dict`` to MONAI ``ViT`` names (see the module docstring);
    ``ValueError`` naming ``where`` when a tensor has no MONAI counterpart.

    Load the result with ``strict=False`` or through :func:`load_monai_vit3d`: MONAI's blocks hold an
    unused ``norm_cross_attn`` that no encoder has.
    """
    state = dict(encoder_state)
    has_cls = "cls_token" in state
    if not has_cls:  # the 2D map reads positions after a class slot: give it an empty one
        pos = state["pos_embed"]
        state["pos_embed"] = torch.cat([pos.new_zeros(pos.shape[0], 1, pos.shape[2]), pos], dim=1)
    return timm_to_monai_vit(state, _depth(state), cls_token=has_cls, where=where)


def load_monai_vit3d(vit: ViT, encoder_state: Mapping[str, torch.Tensor], where: str = "encoder") -> None:
    """Copy encoder weights into ``vit``; ValueError on any key or shape that does not fit."""
    try:
        mapped = monai_vit3d_state(encoder_state, where)
    except KeyError as e:
        raise ValueError(f"{where}: encoder weights are missing {e}") from None
    load_mapped_vit(vit, mapped, where)


def build_vit3d(
    encoder: EncoderLike,
    img_size: int | Sequence[int] | None = None,
    *,
    num_heads: int | None = None,
    dropout_rate: float = 0.0,
    where: str = "encoder",
) -> ViT:
    """A MONAI ``ViT(spatial_dims=3, classification=False)`` carrying the encoder (any patch size).

    ``img_size`` defaults to the encoder's crop (required for a bare ``state_dict``, as is ``num_heads``:
    weights do not record the head count).
    """
    state, heads, size = _resolve(encoder, num_heads, img_size)
    shape = _shape(state)
    vit = ViT(
        in_channels=shape["in_chans"],
        img_size=size,
        patch_size=shape["patch_size"],
        hidden_size=shape["embed_dim"],
        mlp_dim=shape["mlp_dim"],
        num_layers=shape["depth"],
        num_heads=heads,
        proj_type="conv",
        classification=False,
        dropout_rate=dropout_rate,
        spatial_dims=3,
        qkv_bias=True,
    )
    _fill(vit, state, grid_shape3d(size, shape["patch_size"]), where)
    return vit


def _check_unetr(patch_size: int, depth: int, where: str) -> None:
    if patch_size != UNETR_PATCH:
        raise ValueError(f"{where}: encoder patch_size is {patch_size}; MONAI UNETR only takes 16")
    if depth <= max(UNETR_HIDDEN_STATES):
        raise ValueError(
            f"{where}: encoder depth is {depth}; UNETR reads block outputs {UNETR_HIDDEN_STATES}, "
            f"so it needs at least {max(UNETR_HIDDEN_STATES) + 1} blocks"
        )


def build_unetr3d(
    encoder: EncoderLike,
    img_size: int | Sequence[int],
    out_channels: int,
    feature_size: int = 16,
    *,
    num_heads: int | None = None,
    norm_name: str | tuple = "instance",
    res_block: bool = True,
    dropout_rate: float = 0.0,
    where: str = "encoder",
) -> UNETR:
    """A MONAI ``UNETR(spatial_dims=3)`` whose ViT carries the pretrained encoder.

    Args:
        encoder: a :class:`MaskedAutoencoder3D`, its ``.encoder``, or the encoder's ``state_dict``.
        img_size: fine-tuning crop ``S`` or ``(S0, S1, S2)``, multiples of 16 (positions are recomputed).
        out_channels: segmentation classes, background included.
        feature_size, norm_name, res_block, dropout_rate: MONAI UNETR decoder settings.
        num_heads: encoder heads; required only for a bare ``state_dict``.
        where: what errors name (the card's file when called from an export folder).

    The encoder must use 16-voxel patches and have at least 10 blocks (UNETR reads block outputs 3, 6, 9);
    its depth replaces MONAI's fixed 12 blocks.
    """
    state, heads, size = _resolve(encoder, num_heads, img_size)
    shape = _shape(state)
    _check_unetr(shape["patch_size"], shape["depth"], "build_unetr3d")
    grid = grid_shape3d(size, UNETR_PATCH)
    embed_dim, mlp_dim = shape["embed_dim"], shape["mlp_dim"]
    model = monai_unetr(
        3,
        shape["in_chans"],
        out_channels,
        size,
        embed_dim,
        mlp_dim,
        heads,
        shape["depth"],
        "cls_token" in state,
        feature_size=feature_size,
        norm_name=norm_name,
        res_block=res_block,
        dropout_rate=dropout_rate,
    )
    _fill(model.vit, state, grid, where)
    return model


def _resolve(
    encoder: EncoderLike, num_heads: int | None, img_size: int | Sequence[int] | None
) -> tuple[dict[str, torch.Tensor], int, tuple[int, int, int]]:
    """(state_dict, heads, size) from a model, an encoder or a bare state_dict."""
    if isinstance(encoder, MaskedAutoencoder3D):
        encoder = encoder.encoder
    if isinstance(encoder, ViTEncoder3D):
        heads = encoder.num_heads if num_heads is None else num_heads
        size = encoder.img_size if img_size is None else img_size
        return {k: v.detach() for k, v in encoder.state_dict().items()}, heads, as_size3d(size)
    if not isinstance(encoder, Mapping):
        raise ValueError(f"encoder must be a MaskedAutoencoder3D, a ViTEncoder3D or a state_dict, got {type(encoder)}")
    if num_heads is None or img_size is None:
        raise ValueError("num_heads and img_size are required with a bare state_dict (weights do not record them)")
    return dict(encoder), num_heads, as_size3d(img_size)


def _depth(state: Mapping[str, torch.Tensor]) -> int:
    depth = 0
    while f"blocks.{depth}.norm1.weight" in state:
        depth += 1
    return depth


def _shape(state: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """Sizes readable from the weights themselves."""
    try:
        conv = state["patch_embed.proj.weight"]
        mlp = state["blocks.0.mlp.fc1.weight"]
    except KeyError as e:
        raise ValueError(f"encoder state lacks {e}: not a ViTEncoder3D state_dict") from None
    if conv.ndim != 5 or len(set(conv.shape[2:])) != 1:
        raise ValueError(f"encoder patch embedding weight has shape {tuple(conv.shape)}, not a cubic Conv3d")
    return {
        "embed_dim": int(conv.shape[0]),
        "in_chans": int(conv.shape[1]),
        "patch_size": int(conv.shape[2]),
        "mlp_dim": int(mlp.shape[0]),
        "depth": _depth(state),
    }


def _fill(vit: ViT, state: dict[str, torch.Tensor], grid: tuple[int, int, int], where: str) -> None:
    """Give ``vit`` a class token if the encoder had one, positions for ``grid``, then the weights."""
    embed_dim = int(state["patch_embed.proj.weight"].shape[0])
    has_cls = "cls_token" in state
    if has_cls:
        vit.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
    state = {**state, "pos_embed": sincos_pos_embed_3d(embed_dim, grid, cls_token=has_cls)}
    load_monai_vit3d(vit, state, where)


# ----------------------------------------------------------------------------- from an export folder


def read_export3d(
    export_dir: str | Path, load_weights: bool = True
) -> tuple[EncoderSpec3D, dict[str, torch.Tensor] | None]:
    """The checked 3D encoder spec of an export folder and its weights (``None`` unless ``load_weights``);
    :class:`CardError` names the field when the export is 2D or its weights do not fit the card."""
    export_dir = Path(export_dir)
    card = load_card(export_dir)
    where = str(export_dir / CARD_NAME)
    spec = check_encoder_section(card["encoder"], where)
    if isinstance(spec, EncoderSpec):
        raise CardError(
            f"{where}: field 'encoder.arch' is {spec.arch!r}, a 2D encoder; the 3D loaders take medmae_vit3d "
            "exports: use medmae.export.build_unetr (MONAI UNETR 2D) or load_timm_encoder"
        )
    state = read_encoder_weights(export_dir, card) if load_weights else None
    if state is not None:
        check_weights3d(spec, state, where)
    return spec, state


def check_weights3d(spec: EncoderSpec3D, state: Mapping[str, torch.Tensor], where: str) -> None:
    """The weights must have the sizes the card states (CardError naming the first field that differs)."""
    try:
        shape = _shape(state)
    except ValueError as e:
        raise CardError(f"{where}: weights are not a medmae 3D encoder ({e})") from None
    for field, value in (
        ("in_chans", spec.in_chans),
        ("patch_size", spec.patch_size),
        ("embed_dim", spec.embed_dim),
        ("depth", spec.depth),
    ):
        if shape[field] != value:
            raise CardError(f"{where}: field 'encoder.{field}' is {value} but the weights have {shape[field]}")
    if shape["mlp_dim"] != spec.mlp_dim:
        raise CardError(
            f"{where}: field 'encoder.mlp_ratio' gives an MLP of {spec.mlp_dim} but the weights have {shape['mlp_dim']}"
        )
    if ("cls_token" in state) != spec.cls_token:
        raise CardError(f"{where}: field 'encoder.cls_token' is {spec.cls_token} but the weights disagree")
    # the loaders recompute positions rather than read them: that drops nothing only if they are the fixed ones
    expected = sincos_pos_embed_3d(spec.embed_dim, grid_shape3d(spec.img_size, spec.patch_size), spec.cls_token)
    pos = state.get("pos_embed")
    if pos is None or pos.shape != expected.shape or not torch.allclose(pos.float(), expected, atol=1e-5, rtol=0):
        raise CardError(
            f"{where}: weights 'pos_embed' are not the fixed 3D sin-cos positions of the card's "
            f"{list(spec.img_size)} crop; the MONAI loaders recompute positions and would drop them"
        )


def _set_eps(model: nn.Module, eps: float) -> None:
    for module in model.modules():
        if isinstance(module, nn.LayerNorm):
            module.eps = eps


def unetr3d_from_spec(
    spec: EncoderSpec3D,
    state: Mapping[str, torch.Tensor] | None,
    out_channels: int,
    img_size: int | Sequence[int] | None = None,
    *,
    feature_size: int = 16,
    norm_name: str | tuple = "instance",
    res_block: bool = True,
    dropout_rate: float = 0.0,
    where: str = "encoder",
) -> UNETR:
    """MONAI ``UNETR(spatial_dims=3)`` of a 3D encoder spec, carrying ``state`` (``None``: MONAI's random init).

    ``img_size`` defaults to the encoder's pretraining crop; positions are recomputed for another size."""
    size = as_size3d(spec.img_size if img_size is None else img_size)
    _check_unetr(spec.patch_size, spec.depth, where)
    try:
        grid_shape3d(size, UNETR_PATCH)
    except ValueError as e:
        raise ValueError(f"{where}: fine-tuning {e}") from None
    if state is not None:
        model = build_unetr3d(
            dict(state),
            size,
            out_channels,
            feature_size,
            num_heads=spec.num_heads,
            norm_name=norm_name,
            res_block=res_block,
            dropout_rate=dropout_rate,
            where=where,
        )
    else:
        model = monai_unetr(
            3,
            spec.in_chans,
            out_channels,
            size,
            spec.embed_dim,
            spec.mlp_dim,
            spec.num_heads,
            spec.depth,
            spec.cls_token,
            feature_size=feature_size,
            norm_name=norm_name,
            res_block=res_block,
            dropout_rate=dropout_rate,
        )
        if spec.cls_token:
            model.vit.cls_token = nn.Parameter(torch.zeros(1, 1, spec.embed_dim))
            nn.init.normal_(model.vit.cls_token, std=0.02)
    _set_eps(model.vit, spec.layer_norm_eps)
    return model


def build_unetr3d_from_export(
    export_dir: str | Path,
    out_channels: int,
    *,
    img_size: int | Sequence[int] | None = None,
    feature_size: int = 16,
    norm_name: str | tuple = "instance",
    res_block: bool = True,
    dropout_rate: float = 0.0,
    load_weights: bool = True,
) -> UNETR:
    """A MONAI ``UNETR(spatial_dims=3)`` carrying the encoder of a 3D export folder.

    Args:
        export_dir: folder written by ``medmae export`` for a 3D checkpoint (``arch: medmae_vit3d``).
        out_channels: segmentation classes, background included.
        img_size: fine-tuning crop ``(S0, S1, S2)``, multiples of 16; default the encoder's.
        feature_size, norm_name, res_block, dropout_rate: MONAI UNETR decoder settings.
        load_weights: ``False`` keeps MONAI's random init of the same network (the baseline).
    """
    spec, state = read_export3d(export_dir, load_weights)
    return unetr3d_from_spec(
        spec,
        state,
        out_channels,
        img_size,
        feature_size=feature_size,
        norm_name=norm_name,
        res_block=res_block,
        dropout_rate=dropout_rate,
        where=str(Path(export_dir) / CARD_NAME),
    )


def load_vit3d(
    export_dir: str | Path, img_size: int | Sequence[int] | None = None, *, dropout_rate: float = 0.0
) -> ViT:
    """A MONAI ``ViT(spatial_dims=3, classification=False)`` carrying the encoder of a 3D export folder;
    its hidden states equal the encoder's block outputs (``img_size`` default: the encoder's)."""
    spec, state = read_export3d(export_dir)
    assert state is not None
    vit = build_vit3d(
        state,
        spec.img_size if img_size is None else img_size,
        num_heads=spec.num_heads,
        dropout_rate=dropout_rate,
        where=str(Path(export_dir) / CARD_NAME),
    )
    _set_eps(vit, spec.layer_norm_eps)
    return vit
