"""``medmae export CKPT --out DIR``: pretraining checkpoint -> encoder.safetensors + encoder.json.

The checkpoint is read once, with ``torch.load(weights_only=True)``: a file that carries code is
refused, never executed.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from medmae.export.card import CARD_NAME
from medmae.export.encoder import CheckpointError, export_checkpoint


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="medmae export", description=__doc__)
    parser.add_argument("checkpoint", type=Path, help="a .ckpt written by `medmae fit` or `medmae demo`")
    parser.add_argument("--out", type=Path, required=True, help="directory for encoder.safetensors + encoder.json")
    args = parser.parse_args(list(argv))
    if not args.checkpoint.is_file():
        parser.error(f"checkpoint not found: {args.checkpoint}")
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"--out {args.out} is a file; give a directory")
    try:
        weights = export_checkpoint(args.checkpoint, args.out)
    except CheckpointError as e:
        parser.error(str(e))
    print(f"encoder weights: {weights}\nencoder card:    {args.out / CARD_NAME}")
    return 0
