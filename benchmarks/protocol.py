"""The test protocol every transfer benchmark follows: validation by default, test only with ``--final-test``,
and every look at test written to a committed log.

Recipes are chosen on validation (the default: test data is never scored). ``--final-test`` scores the
held-out split once for the chosen recipe, and appends one JSON line to
``benchmarks/results/test_looks.jsonl``: date, commit, benchmark, recipe, every seed's scores and the
summary. The number of looks at test is then part of the record, and a reader can count them.

    from benchmarks.protocol import add_protocol_arguments, log_test_look
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import statistics
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
#: one JSON object per line, one line per ``--final-test`` run of any transfer benchmark
TEST_LOG = RESULTS / "test_looks.jsonl"
#: the starts every transfer benchmark compares: pretrained, the plain and the fair baseline
INITS = ("medmae", "random", "random-sincos")
BASELINES = ("random", "random-sincos")


def benchmark_parser(doc: str | None, recipe: Any, quick_help: str) -> argparse.ArgumentParser:
    """The command line every transfer benchmark shares: seeds, work folder, ``--quick``, threads,
    ``--json``, ``--encoder``, the protocol's flags, ``--inits``, and one flag per field of the
    ``recipe`` dataclass instance (tuples take two values, bools ``true``/``false``)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--work", type=Path, default=None, help="keep intermediate files here (default: temporary)")
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: see docs/transfer.md, Cost)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument(
        "--encoder",
        type=Path,
        default=None,
        help="an existing export folder to fine-tune (skips pretraining; its card sets the encoder)",
    )
    add_protocol_arguments(parser)
    parser.add_argument(
        "--inits",
        nargs="+",
        choices=INITS,
        default=list(INITS),
        help="which starts to fine-tune: pretrained, random init, random init with the pretrained sin-cos positions",
    )
    for field, default in dataclasses.asdict(recipe).items():
        kind = type(default[0]) if isinstance(default, tuple) else type(default)
        flag = f"--{field.replace('_', '-')}"
        if kind is bool:
            parser.add_argument(flag, type=lambda s: s.lower() in ("1", "true", "yes"), default=default)
        else:
            parser.add_argument(flag, type=kind, default=default, nargs=2 if isinstance(default, tuple) else None)
    return parser


def recipe_record(recipe: Any, encoder: Path | None, pretrain_fields: Sequence[str]) -> dict[str, object]:
    """The recipe as run: with a given encoder (``--encoder``) its ``pretrain_fields`` describe nothing that
    ran, so they are replaced by a pointer to that export's card."""
    record: dict[str, object] = dataclasses.asdict(recipe)
    if encoder is not None:
        for field in pretrain_fields:
            record.pop(field)
        record["pretraining"] = f"not run: --encoder given (its settings: {encoder.name}/encoder.json)"
    return record


def recipe_values(args: argparse.Namespace, recipe: Any) -> dict[str, Any]:
    """The recipe fields as parsed by :func:`benchmark_parser` (two-value flags back to tuples)."""
    return {
        f: (tuple(getattr(args, f)) if isinstance(d, tuple) else getattr(args, f))
        for f, d in dataclasses.asdict(recipe).items()
    }


def add_protocol_arguments(parser: argparse.ArgumentParser) -> None:
    """``--final-test`` (score the test split once, logged) and ``--test-log`` (where the look is logged)."""
    parser.add_argument(
        "--final-test",
        action="store_true",
        help="also score the held-out test split (once per chosen recipe); the look is appended to --test-log",
    )
    parser.add_argument("--test-log", type=Path, default=TEST_LOG, help=f"the test-look log (default {TEST_LOG})")


def commit() -> str:
    """The repository's HEAD commit, ``+dirty`` when the work tree has uncommitted changes or untracked
    files (a benchmark not yet committed is code too; ``unknown`` outside git)."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root,
                               capture_output=True, text=True, check=True)  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def log_test_look(
    benchmark: str,
    recipe: Mapping[str, Any],
    per_seed: Mapping[str, Sequence[Mapping[str, float]]],
    summary: Mapping[str, Any],
    path: Path = TEST_LOG,
    code: str | None = None,
) -> dict[str, Any]:
    """Append one look at test to ``path`` (created with its folder) and return the line written.

    ``code``: the commit the run started from (:func:`commit` at its start; default: now).
    """
    line = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "commit": code or commit(),
        "benchmark": benchmark,
        "recipe": dict(recipe),
        "per_seed": {init: [dict(r) for r in rows] for init, rows in per_seed.items()},
        "summary": dict(summary),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(line, sort_keys=True, allow_nan=False) + "\n")
    return line


def compare(scores: Mapping[str, Sequence[float]]) -> dict[str, Any]:
    """Pretrained (``medmae``) against each baseline that ran: mean, sd, ratio and strict separation.

    ``every_seed_above``: the worst pretrained seed beats the best baseline seed; ``margin``: by how much
    (negative when the seeds overlap). Compared with the seed-to-seed spread it says whether a gain is
    more than selection noise.
    """

    out: dict[str, Any] = {}
    pre = list(scores.get("medmae", ()))
    for init, values in scores.items():
        if values:
            out[f"{init}_mean"] = statistics.mean(values)
            out[f"{init}_sd"] = statistics.pstdev(values)
    for base in BASELINES:
        rnd = list(scores.get(base, ()))
        if pre and rnd:
            out[f"ratio_vs_{base}"] = statistics.mean(pre) / statistics.mean(rnd)
            out[f"margin_vs_{base}"] = min(pre) - max(rnd)
            out[f"every_seed_above_{base}"] = min(pre) > max(rnd)
    return out


def print_table(results: dict[str, list[dict[str, float]]], seeds: list[int], role: str, metric: str) -> None:
    """One markdown row per start, every seed shown."""
    names = {"medmae": "medmae-pretrained", "random": "random init", "random-sincos": "random + sin-cos positions"}
    print("| init | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± sd |")
    print("|---|" + "---:|" * (len(seeds) + 1))
    for init, rows in results.items():
        vals = [r[role] for r in rows]
        if vals:
            print(
                f"| {names[init]} ({role} {metric}) | " + " | ".join(f"{v:.4f}" for v in vals)
                + f" | {statistics.mean(vals):.4f} ± {statistics.pstdev(vals):.4f} |"
            )  # fmt: skip


def print_comparison(summary: dict[str, Any], role: str) -> None:
    """One line per baseline: the ratio, whether every pretrained seed is above it, and the margin."""
    for base in BASELINES:
        if f"ratio_vs_{base}" in summary:
            print(
                f"{role}: pretrained / {base} = {summary[f'ratio_vs_{base}']:.3f}x; every pretrained seed above "
                f"every {base} seed: {summary[f'every_seed_above_{base}']} (margin {summary[f'margin_vs_{base}']:+.4f})"
            )


#: what a run without ``--final-test`` says after its split line
NOT_SCORED = " (not scored: validation only; --final-test scores it once, logged)"


def finish_run(
    args: argparse.Namespace,
    benchmark: str,
    look_recipe: Mapping[str, Any],
    report: dict[str, Any],
    results: Mapping[str, Sequence[Mapping[str, float]]],
    metric: str,
    code: str,
) -> None:
    """The end every transfer benchmark shares: log the look at test (``--final-test`` only), print
    the per-seed tables and comparisons of each scored role, and write ``--json``."""
    roles = ("val", "test") if args.final_test else ("val",)
    if args.final_test:
        log_test_look(benchmark, look_recipe, results, report["test"], args.test_log, code)
    for role in roles:
        print_table(results, args.seeds, role, metric)  # type: ignore[arg-type]
        print_comparison(report[role], role)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
