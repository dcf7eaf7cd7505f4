"""What do the encoder's tokens hold? A ridge probe on frozen tokens of each tapped block, per start.

A diagnostic beside ``benchmarks/transfer.py`` (docs/transfer.md, the ventricles section): for the
pretrained encoder, random init and random init with the pretrained sin-cos positions, it reads the
tokens of blocks 3, 6, 9 and 12 on the labelled slabs of a ``transfer.py --work`` folder (planes
through the card's preprocessing, exactly as fine-tuning sees them), and fits a ridge regression from
each patch's token to that patch's fraction of grey matter, white matter and tissue-enclosed CSF
(a per-plane version of the ventricle label: holes of the tissue mask, components of >= 40 pixels).
Fitted on the training slabs, scored (R^2) on the validation slabs; never on test.

    python benchmarks/transfer.py --work W --seeds 0 --inits medmae   # writes W/labelled and W/encoder
    python benchmarks/probe_tokens.py --work W
"""

from __future__ import annotations

import argparse
import platform
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from medmae.finetune.cases import Case
from medmae.finetune.encoders import parse_init, resolve_encoder
from medmae.finetune.seg_data import PreparedCase, prepare_case
from medmae.finetune.segment import build_segmenter

BLOCKS = (2, 5, 8, 11)  # 0-based: blocks 3, 6, 9, 12
TARGETS = ("grey matter", "white matter", "enclosed CSF")


def cases(work: Path, role: str, pre: object) -> list[PreparedCase]:
    """The ``role`` slabs of a transfer.py work folder, prepared as fine-tuning prepares them."""
    images = sorted((work / "labelled").glob(f"{role}_??.nii.gz"))
    return [
        prepare_case(Case(0, str(i), str(i).replace(".nii.gz", "_label.nii.gz"), "", role), pre, 3, None, None)
        for i in images
    ]  # type: ignore[arg-type]


def enclosed_csf(labels: np.ndarray, min_pixels: int = 40) -> np.ndarray:
    """Per plane: holes of the tissue mask (CSF that tissue encloses), components >= ``min_pixels``."""
    out = np.zeros(labels.shape, bool)
    for z in range(labels.shape[0]):
        tissue = labels[z] > 0
        holes = ndimage.binary_fill_holes(tissue) & ~tissue
        parts, n = ndimage.label(holes)
        if n:
            sizes = ndimage.sum(holes, parts, range(1, n + 1))
            out[z] = np.isin(parts, 1 + np.flatnonzero(sizes >= min_pixels))
    return out


def patch_targets(prepared: list[PreparedCase], patch: int) -> torch.Tensor:
    """(tokens, 3): each patch's fraction of grey matter, white matter and enclosed CSF."""
    rows = []
    for c in prepared:
        lab = c.labels.numpy()
        onehot = torch.as_tensor(np.stack([lab == 1, lab == 2, enclosed_csf(lab)], 1).astype(np.float32))
        rows.append(F.avg_pool2d(onehot, patch).permute(0, 2, 3, 1).reshape(-1, 3))
    return torch.cat(rows)


def block_tokens(init: str, export: Path, prepared: list[PreparedCase]) -> dict[int, torch.Tensor]:
    """Patch tokens after each block of :data:`BLOCKS`, LayerNorm-ed as the light decoder's taps are."""
    torch.manual_seed(0)
    encoder = build_segmenter(resolve_encoder(parse_init(f"{init}:{export}")), 3, decoder="light").model.encoder
    out: dict[int, list[torch.Tensor]] = {b: [] for b in BLOCKS}
    with torch.no_grad():
        for c in prepared:
            t = encoder.norm_pre(encoder._pos_embed(encoder.patch_embed(c.images)))
            for i, block in enumerate(encoder.blocks):
                t = block(t)
                if i in out:
                    out[i].append(t[:, encoder.num_prefix_tokens :])
    return {b: F.layer_norm(torch.cat(v), v[0].shape[-1:]).reshape(-1, v[0].shape[-1]) for b, v in out.items()}


def ridge_r2(
    xtr: torch.Tensor, ytr: torch.Tensor, xva: torch.Tensor, yva: torch.Tensor, lam: float = 0.1
) -> list[float]:
    """R^2 per target of a ridge fit on standardised features (+ bias), fitted on train, scored on val."""
    mu, sd = xtr.mean(0), xtr.std(0) + 1e-6
    a = torch.cat([(xtr - mu) / sd, torch.ones(len(xtr), 1)], 1)
    b = torch.cat([(xva - mu) / sd, torch.ones(len(xva), 1)], 1)
    w = torch.linalg.solve(a.T @ a + lam * len(a) * torch.eye(a.shape[1]), a.T @ ytr)
    residual = ((b @ w - yva) ** 2).sum(0)
    return (1 - residual / ((yva - yva.mean(0)) ** 2).sum(0)).tolist()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True, help="a transfer.py --work folder (labelled/, encoder/)")
    parser.add_argument("--encoder", type=Path, default=None, help="export folder (default WORK/encoder)")
    args = parser.parse_args(argv)
    export = args.encoder or args.work / "encoder"
    torch.set_num_threads(1)
    source = resolve_encoder(parse_init(f"medmae:{export}"))
    pre, patch = source.preprocessing, int(source.spec.patch_size)
    train, val = cases(args.work, "train", pre), cases(args.work, "val", pre)
    ytr, yva = patch_targets(train, patch), patch_targets(val, patch)
    print(f"machine: {platform.machine()}, torch {torch.__version__}; {len(ytr)} train / {len(yva)} val tokens")
    print("| start | block | R2 " + " | R2 ".join(TARGETS) + " |\n|---|---:|---:|---:|---:|")
    for init in ("medmae", "random", "random-sincos"):
        xtr, xva = block_tokens(init, export, train), block_tokens(init, export, val)
        for b in BLOCKS:
            r2 = ridge_r2(xtr[b], ytr, xva[b], yva)
            print(f"| {init} | {b + 1} | " + " | ".join(f"{v:.3f}" for v in r2) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
