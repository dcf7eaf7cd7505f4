"""Layer-wise learning-rate decay (BEiT / MAE fine-tuning): deeper encoder blocks learn faster.

Layer ids of a ViT with ``depth`` blocks: patch embedding, positions and class token are layer 0,
block ``i`` is layer ``i + 1``, everything after the encoder (final norm, fc_norm, head, a
segmentation decoder) is layer ``depth + 1``. A parameter of layer ``l`` gets

    lr_scale = layer_decay ** (depth + 1 - l)

so the head trains at the full lr and the patch embedding at ``layer_decay ** (depth + 1)`` of it.
Weight decay is not applied to biases, norms, positions and tokens (as in pretraining).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from torch import nn

#: parameters of layer 0 (relative to the encoder's own names): embeddings and tokens
EMBEDDING_NAMES = ("patch_embed", "pos_embed", "cls_token", "reg_token", "patch_embedding", "mask_token")
NO_DECAY_NAMES = ("pos_embed", "cls_token", "position_embeddings", "reg_token")
_BLOCK = re.compile(r"^blocks\.(\d+)\.")


def encoder_layer_id(name: str, depth: int) -> int:
    """Layer id of a parameter named as inside the encoder (timm or MONAI ViT names)."""
    if name.startswith(EMBEDDING_NAMES):
        return 0
    match = _BLOCK.match(name)
    if match:
        return int(match.group(1)) + 1
    return depth + 1


def layer_decay_groups(
    named_params: Iterable[tuple[str, nn.Parameter]],
    *,
    depth: int,
    layer_decay: float,
    weight_decay: float,
    encoder_prefix: str = "",
    include_frozen: bool = False,
) -> list[dict[str, Any]]:
    """AdamW parameter groups carrying ``lr_scale`` (to multiply into the scheduled lr) per layer.

    Args:
        named_params: ``model.named_parameters()``.
        depth: number of encoder blocks.
        layer_decay: factor per layer, in (0, 1]; 1 disables decay.
        weight_decay: AdamW weight decay for weight matrices.
        encoder_prefix: prefix of the encoder's parameters in ``model`` (e.g. ``"vit."`` in UNETR,
            ``""`` for a timm classifier); parameters outside it are at the top layer.
        include_frozen: group parameters that do not require a gradient too (the groups of a build in
            which they did, for :func:`drop_untrained`).
    """
    if not 0.0 < layer_decay <= 1.0:
        raise ValueError(f"layer_decay must be in (0, 1], got {layer_decay!r}")
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, p in named_params:
        if not (p.requires_grad or include_frozen):
            continue
        inside = name.startswith(encoder_prefix)
        local = name[len(encoder_prefix) :] if inside else name
        layer = encoder_layer_id(local, depth) if inside else depth + 1
        no_decay = p.ndim <= 1 or local.endswith(NO_DECAY_NAMES)
        key = (layer, no_decay)
        if key not in groups:
            groups[key] = {
                "params": [],
                "names": [],
                "weight_decay": 0.0 if no_decay else weight_decay,
                "lr_scale": layer_decay ** (depth + 1 - layer),
                "layer": layer,
                "encoder": inside and layer <= depth,  # embeddings and blocks (what encoder_hold holds)
            }
        groups[key]["params"].append(p)
        groups[key]["names"].append(name)
    return [groups[k] for k in sorted(groups)]


def drop_untrained(state: dict[str, Any], saved_names: list[list[str]], trained: set[str]) -> dict[str, Any]:
    """An optimizer ``state_dict`` whose groups held ``saved_names`` (per group, in order), without the
    parameters that are no longer trained (names not in ``trained``), renumbered as the current groups are.

    A run saved while a parameter was still trainable (MONAI's unused cross-attention norms before
    2026-12-07) then resumes, its other moments kept exactly. A state whose group sizes do not match
    ``saved_names`` is returned as it is (the optimizer's own load then says what differs).
    """
    saved_groups = state.get("param_groups", [])
    if [len(g["params"]) for g in saved_groups] != [len(names) for names in saved_names]:
        return state
    groups, moved = [], {}
    for group, names in zip(saved_groups, saved_names, strict=True):
        kept = [index for index, name in zip(group["params"], names, strict=True) if name in trained]
        for index in kept:
            moved[index] = len(moved)
        groups.append({**group, "params": [moved[i] for i in kept]})
    saved = state.get("state", {})
    return {**state, "state": {moved[i]: v for i, v in saved.items() if i in moved}, "param_groups": groups}
