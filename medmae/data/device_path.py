"""The GPU data path: workers ship stored-value crops, the device resizes and scales them per batch.

On CUDA the CPU cost of a sample is dominated by the antialiased resize (DESIGN.md section 3), so
the loader can starve a fast accelerator. With ``CacheDataModule(device_transforms=...)`` on, each
worker stops after choosing and reading the crop: a sample carries its crop in the storage dtype
(int16 for CT) *unflipped*, its flip flag and its intensity ranges as ``(low, width)``. Collation
pads the crops of a batch to a common size; after the (pinned, non-blocking) copy, Lightning's
``on_after_batch_transfer`` calls :func:`finish_batch`, which flips, resizes (per sample: crops
differ in size) and scales on the device. Same functions, same order, same RNG draws as the CPU
path: the two give the same numbers (tested on CPU tensors).

Sizes and flips stay host lists in the batch, so the device step needs no host synchronisation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import default_collate

from medmae.data.transforms import SliceTransform, resize

#: batch keys of a deferred batch, replaced by ``"image"`` on the device
RAW_KEYS = ("raw", "raw_hw", "flip", "low", "inv_width")


def raw_sample(values: np.ndarray, ranges: Sequence[tuple[float, float]], flip: bool) -> dict[str, Any]:
    """One deferred sample: the crop (storage dtype), its flip, and each range as (low, 1 / width).

    ``1 / width`` is what the CPU path's scalar division computes (float32 reciprocal of the float32
    width), so both paths round alike.
    """
    width = torch.tensor([hi - lo for lo, hi in ranges], dtype=torch.float32)
    return {
        "raw": torch.from_numpy(np.ascontiguousarray(values)),
        "raw_hw": tuple(int(s) for s in values.shape[-2:]),
        "flip": bool(flip),
        "low": torch.tensor([lo for lo, _ in ranges], dtype=torch.float32),
        "inv_width": torch.reciprocal(width),
    }


def collate_raw(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Pad the crops of a batch into one ``(B, k, H_max, W_max)`` tensor of their common dtype."""
    raws = [s["raw"] for s in samples]
    dtype = raws[0].dtype
    for r in raws[1:]:
        dtype = torch.promote_types(dtype, r.dtype)
    if dtype == torch.uint16:  # no arithmetic kernels for uint16 on every device
        dtype = torch.int32
    k = raws[0].shape[0]
    height = max(int(r.shape[-2]) for r in raws)
    width = max(int(r.shape[-1]) for r in raws)
    batch_raw = torch.zeros((len(raws), k, height, width), dtype=dtype)
    for i, r in enumerate(raws):
        batch_raw[i, :, : r.shape[-2], : r.shape[-1]] = r
    rest = default_collate([{k: v for k, v in s.items() if k not in RAW_KEYS} for s in samples])
    return {
        **rest,
        "raw": batch_raw,
        "raw_hw": [s["raw_hw"] for s in samples],
        "flip": [s["flip"] for s in samples],
        "low": torch.stack([s["low"] for s in samples]),
        "inv_width": torch.stack([s["inv_width"] for s in samples]),
    }


def finish_batch(batch: dict[str, Any], transform: SliceTransform) -> torch.Tensor:
    """``(B, C, H, W)`` float32 in [0, 1] on the batch's device: flip, resize, window / percentiles, clip.

    Channels are window-major (``[window0: slices..., window1: slices...]``), as on the CPU path.
    """
    raw = batch["raw"]
    images = []
    for i, ((h, w), flip) in enumerate(zip(batch["raw_hw"], batch["flip"], strict=True)):
        crop = raw[i, :, :h, :w]
        if flip:
            crop = crop.flip(-1)
        images.append(resize(crop.float(), transform.out_size, transform.interpolation, transform.antialias))
    image = torch.stack(images)  # (B, k, H, W)
    low = batch["low"][:, :, None, None, None].to(image.dtype)
    inv_width = batch["inv_width"][:, :, None, None, None].to(image.dtype)
    out = ((image[:, None] - low) * inv_width).clamp_(0.0, 1.0)  # (B, G, k, H, W)
    return out.reshape(image.shape[0], -1, *image.shape[-2:])


def finish_on_device(batch: dict[str, Any], transform: SliceTransform) -> dict[str, Any]:
    """Replace the raw entries of a deferred batch by its ``"image"`` (a no-op for a finished batch)."""
    if not isinstance(batch, dict) or "raw" not in batch:
        return batch
    image = finish_batch(batch, transform)
    out = {k: v for k, v in batch.items() if k not in RAW_KEYS}
    out["image"] = image
    return out
