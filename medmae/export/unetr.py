"""An exported encoder inside MONAI ``UNETR`` (2D) through an explicit timm -> MONAI key map.

MONAI's UNETR builds its own ``monai.networks.nets.ViT`` (patch 16, reads hidden states 3, 6, 9 and
the normed output), whose parameter names differ from timm's. The map, per block ``i``::

    timm                          MONAI (unetr.vit)
    patch_embed.proj.{weight,bias} patch_embedding.patch_embeddings.{weight,bias}
    pos_embed[:, 1:]              patch_embedding.position_embeddings
    cls_token + pos_embed[:, :1]  cls_token                 (kept: see below)
    blocks.i.norm1 / norm2        blocks.i.norm1 / norm2
    blocks.i.attn.qkv             blocks.i.attn.qkv         (same (3, heads, head_dim) row layout)
    blocks.i.attn.proj            blocks.i.attn.out_proj
    blocks.i.mlp.fc1 / fc2        blocks.i.mlp.linear1 / linear2
    norm                          norm

MONAI's LayerNorms get timm's ``eps=1e-6`` so the two stacks compute the same function.

The MAE encoder was pretrained with its class token attending beside the patches, so by default the
token is kept: MONAI's ViT prepends a ``cls_token`` when it has one, and :class:`EncoderUNETR` (a
``UNETR`` subclass) drops it before reshaping tokens into feature maps. Then every hidden state MONAI
returns equals timm's block output (tested within 1e-5). ``cls_token=False`` gives a plain UNETR that
never sees the token.

No encoder tensor is dropped silently: every tensor of the source ``state_dict`` must be consumed by
the map above or be listed in :data:`UNUSED_ENCODER_KEYS` (with the reason); anything else (e.g. a
LayerScale ``blocks.i.ls1.gamma``, register tokens, q/k norms, extra blocks) is a ``ValueError`` naming
the keys, because MONAI's blocks have no place for it and the network would compute another function.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from pathlib import Path

import torch
from monai.networks.blocks.transformerblock import TransformerBlock
from monai.networks.nets import UNETR
from torch import nn

from medmae.export.adapt import adapt_state_dict
from medmae.export.card import CARD_NAME, EncoderSpec, EncoderSpec3D, check_encoder_2d, load_card, refuse_3d
from medmae.export.encoder import name_keys, read_encoder_weights
from medmae.models import as_hw

#: MONAI's UNETR reads these hidden states (0-based block outputs) and always uses 16-pixel patches.
UNETR_HIDDEN_STATES = (3, 6, 9)
UNETR_PATCH = 16

#: Source encoder tensors the key map may leave unused; every other one must be consumed.
#: ``cls_token``: read when the ViT keeps the class token (the default). ``cls_token=False`` builds a
#: stock UNETR that never sees the token, so the token and its position slot (``pos_embed[:, :1]``)
#: are deliberately left out. (The final ``norm`` is not here: UNETR decodes the normed output.)
UNUSED_ENCODER_KEYS: frozenset[str] = frozenset({"cls_token"})


class EncoderUNETR(UNETR):
    """MONAI ``UNETR`` whose ViT keeps the pretrained class token; it is dropped before the decoder."""

    def proj_feat(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self.vit, "cls_token"):
            x = x[:, 1:]
        return super().proj_feat(x)


def timm_to_monai_vit(
    state: Mapping[str, torch.Tensor], depth: int, cls_token: bool, where: str = "encoder"
) -> dict[str, torch.Tensor]:
    """Rename a timm ViT ``state_dict`` to MONAI ``ViT`` names (see the module docstring).

    ``KeyError`` when a tensor the map needs is missing; ``ValueError`` (naming ``where`` and the keys)
    when a source tensor is neither consumed nor in :data:`UNUSED_ENCODER_KEYS`.
    """
    pos = state["pos_embed"]
    out = {
        "patch_embedding.patch_embeddings.weight": state["patch_embed.proj.weight"],
        "patch_embedding.patch_embeddings.bias": state["patch_embed.proj.bias"],
        "patch_embedding.position_embeddings": pos[:, 1:],
        "norm.weight": state["norm.weight"],
        "norm.bias": state["norm.bias"],
    }
    used = {"pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight", "norm.bias"}
    if cls_token:
        out["cls_token"] = state["cls_token"] + pos[:, :1]
        used.add("cls_token")
    names = {
        "norm1": "norm1",
        "norm2": "norm2",
        "attn.qkv": "attn.qkv",
        "attn.proj": "attn.out_proj",
        "mlp.fc1": "mlp.linear1",
        "mlp.fc2": "mlp.linear2",
    }
    for i in range(depth):
        for timm_name, monai_name in names.items():
            for p in ("weight", "bias"):
                out[f"blocks.{i}.{monai_name}.{p}"] = state[f"blocks.{i}.{timm_name}.{p}"]
                used.add(f"blocks.{i}.{timm_name}.{p}")
    check_consumed(state, used, where)
    return out


def check_consumed(state: Mapping[str, torch.Tensor], used: Collection[str], where: str) -> None:
    """``ValueError`` naming the source tensors the key map left unused, unless listed in
    :data:`UNUSED_ENCODER_KEYS`: dropping any other one would change the function the encoder computes."""
    left = sorted(set(state) - set(used) - UNUSED_ENCODER_KEYS)
    if left:
        raise ValueError(
            f"{where}: encoder weights hold {len(left)} tensor(s) MONAI's ViT has no place for: {name_keys(left)}; "
            "MONAI's ViT takes plain pre-norm blocks (no LayerScale, registers or q/k norms)"
        )


def _check_spec(spec: EncoderSpec, img_size: tuple[int, int], depth: int, where: str) -> None:
    if spec.patch_size != UNETR_PATCH:
        raise ValueError(
            f"{where}: field 'encoder.patch_size' is {spec.patch_size}; MONAI UNETR only takes 16-pixel patches "
            "(pretrain with model.mae.patch_size: 16 and at least 10 blocks, "
            "e.g. configs/pretrain/vit_tiny_unetr_cpu.yaml)"
        )
    if depth <= max(UNETR_HIDDEN_STATES):
        raise ValueError(
            f"{where}: field 'encoder.kwargs.depth' is {depth}; MONAI UNETR reads block outputs "
            f"{UNETR_HIDDEN_STATES}, so the encoder needs at least {max(UNETR_HIDDEN_STATES) + 1} blocks"
        )
    if any(s % UNETR_PATCH for s in img_size):
        raise ValueError(f"build_unetr: img_size {list(img_size)} must be a multiple of {UNETR_PATCH}")


def build_unetr(
    export_dir: str | Path,
    out_channels: int,
    *,
    img_size: int | Sequence[int] | None = None,
    in_chans: int | None = None,
    feature_size: int = 16,
    norm_name: str | tuple = "instance",
    res_block: bool = True,
    dropout_rate: float = 0.0,
    cls_token: bool = True,
    load_weights: bool = True,
) -> UNETR:
    """A MONAI ``UNETR(spatial_dims=2)`` carrying an exported encoder (``load_weights=False``: random init).

    Args:
        export_dir: folder written by ``medmae export`` (``encoder.json`` + ``encoder.safetensors``).
        out_channels: segmentation classes, background included.
        img_size: input ``(H, W)``; default the card's (positions are resampled otherwise).
        in_chans: input channels; default the card's (patch embedding adapted otherwise).
        feature_size, norm_name, res_block, dropout_rate: MONAI UNETR decoder settings.
        cls_token: keep the pretrained class token in the ViT (see the module docstring).
        load_weights: copy the exported weights; ``False`` keeps MONAI's random init of the same model
            (the baseline of a transfer comparison).
    """
    export_dir = Path(export_dir)
    card = load_card(export_dir)
    where = str(export_dir / CARD_NAME)
    spec = check_encoder_2d(card["encoder"], where, "build_unetr")
    state = read_encoder_weights(export_dir, card) if load_weights else None
    return unetr_from_encoder(
        spec,
        state,
        out_channels,
        img_size=img_size,
        in_chans=in_chans,
        feature_size=feature_size,
        norm_name=norm_name,
        res_block=res_block,
        dropout_rate=dropout_rate,
        cls_token=cls_token,
        where=where,
    )


def monai_unetr(
    spatial_dims: int,
    in_channels: int,
    out_channels: int,
    img_size: Sequence[int],
    embed_dim: int,
    mlp_dim: int,
    heads: int,
    depth: int,
    cls_token: bool,
    *,
    feature_size: int = 16,
    norm_name: str | tuple = "instance",
    res_block: bool = True,
    dropout_rate: float = 0.0,
) -> UNETR:
    """MONAI's UNETR (2D or 3D) shaped like a medmae encoder: conv patch embedding, qkv bias, the
    encoder's depth (MONAI always builds 12 blocks), and :class:`EncoderUNETR` when it keeps a class token."""
    cls = EncoderUNETR if cls_token else UNETR
    model = cls(
        in_channels=in_channels,
        out_channels=out_channels,
        img_size=tuple(img_size),
        feature_size=feature_size,
        hidden_size=embed_dim,
        mlp_dim=mlp_dim,
        num_heads=heads,
        proj_type="conv",
        norm_name=norm_name,
        conv_block=True,
        res_block=res_block,
        dropout_rate=dropout_rate,
        spatial_dims=spatial_dims,
        qkv_bias=True,
    )
    if len(model.vit.blocks) != depth:
        model.vit.blocks = nn.ModuleList(
            TransformerBlock(embed_dim, mlp_dim, heads, dropout_rate, qkv_bias=True) for _ in range(depth)
        )
    freeze_cross_attention(model)
    return model


def freeze_cross_attention(model: nn.Module) -> None:
    """Take the cross-attention parameters MONAI's ``TransformerBlock`` always builds out of training.

    UNETR never calls them (``with_cross_attention=False``), so they get no gradient, and plain DDP
    stops at the end of the first step ("parameters that were not used in producing loss") unless
    the user knows to ask for ``ddp_find_unused_parameters_true``, which costs a graph walk per step.
    Frozen, they stay in the state dict, so fine-tuning checkpoints load as before.
    """
    for block in model.modules():
        if isinstance(block, TransformerBlock) and not getattr(block, "with_cross_attention", False):
            for name in ("norm_cross_attn", "cross_attn"):
                part = getattr(block, name, None)
                if isinstance(part, nn.Module):
                    part.requires_grad_(False)


def unetr_from_encoder(
    spec: EncoderSpec,
    state: dict[str, torch.Tensor] | None,
    out_channels: int,
    *,
    img_size: int | Sequence[int] | None = None,
    in_chans: int | None = None,
    feature_size: int = 16,
    norm_name: str | tuple = "instance",
    res_block: bool = True,
    dropout_rate: float = 0.0,
    cls_token: bool = True,
    where: str = "encoder",
) -> UNETR:
    """:func:`build_unetr` from an encoder spec and a timm ``state_dict`` (``None``: random init)."""
    if isinstance(spec, EncoderSpec3D):
        raise refuse_3d(where, "unetr_from_encoder (2D UNETR)")
    size = as_hw(img_size) if img_size is not None else spec.img_size
    chans = spec.in_chans if in_chans is None else int(in_chans)
    meta = _meta_encoder(spec)
    depth, heads = len(meta.blocks), int(meta.blocks[0].attn.num_heads)
    mlp_dim = int(meta.blocks[0].mlp.fc1.out_features)
    _check_spec(spec, size, depth, where)
    embed_dim = spec.embed_dim
    model = monai_unetr(
        2,
        chans,
        out_channels,
        size,
        embed_dim,
        mlp_dim,
        heads,
        depth,
        cls_token,
        feature_size=feature_size,
        norm_name=norm_name,
        res_block=res_block,
        dropout_rate=dropout_rate,
    )
    vit = model.vit
    if cls_token:
        vit.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        nn.init.normal_(vit.cls_token, std=0.02)
    for module in vit.modules():
        if isinstance(module, nn.LayerNorm):
            module.eps = 1e-6
    if state is not None:
        grid = (spec.img_size[0] // spec.patch_size, spec.img_size[1] // spec.patch_size)
        new_grid = (size[0] // UNETR_PATCH, size[1] // UNETR_PATCH)
        state = adapt_state_dict(state, old_grid=grid, new_grid=new_grid, in_chans=chans)
        try:
            mapped = timm_to_monai_vit(state, depth, cls_token, where)
        except KeyError as e:
            raise ValueError(f"{where}: encoder weights lack {e} for a {depth}-block ViT") from None
        load_mapped_vit(vit, mapped, where)
    return model


def load_mapped_vit(vit: nn.Module, mapped: dict[str, torch.Tensor], where: str) -> None:
    """Load MONAI-named encoder weights into a MONAI ViT; ValueError on any key or shape that does not fit
    (the cross-attention norms MONAI always builds are unused and may stay missing)."""
    try:
        missing, unexpected = vit.load_state_dict(mapped, strict=False)
    except RuntimeError as e:
        raise ValueError(f"{where}: encoder weights do not fit MONAI ViT ({str(e).splitlines()[1:2]})") from None
    missing = [k for k in missing if ".norm_cross_attn." not in k]
    if missing or unexpected:
        raise ValueError(
            f"{where}: encoder weights do not map onto MONAI ViT: missing {name_keys(missing)}, "
            f"unexpected {name_keys(unexpected)}"
        )


def _meta_encoder(spec: EncoderSpec) -> torch.nn.Module:
    """The timm encoder of ``spec`` on the meta device: its sizes, without allocating weights."""
    import timm

    kwargs = {k: v for k, v in spec.kwargs.items() if k != "drop_path_rate"}
    with torch.device("meta"):
        return timm.create_model(
            spec.arch, pretrained=False, num_classes=0, in_chans=spec.in_chans, img_size=spec.img_size, **kwargs
        )
