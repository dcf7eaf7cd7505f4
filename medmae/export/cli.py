"""``medmae export CKPT --out DIR``: pretraining checkpoint -> encoder.safetensors + encoder.json."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from medmae.export.encoder import CARD_NAME, export_checkpoint


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="medmae export", description=__doc__)
    parser.add_argument("checkpoint", type=Path, help="a .ckpt written by `medmae fit` or `medmae demo`")
    parser.add_argument("--out", type=Path, required=True, help="directory for encoder.safetensors + encoder.json")
    args = parser.parse_args(list(argv))
    if not args.checkpoint.is_file():
        parser.error(f"checkpoint not found: {args.checkpoint}")
    weights = export_checkpoint(args.checkpoint, args.out)
    print(f"encoder weights: {weights}\nencoder card:    {args.out / CARD_NAME}")
    return 0
