"""``medmae prep`` / ``python -m data_prep``: archive -> de-identified training cache.

    medmae prep ARCHIVE_DIR [ARCHIVE_DIR ...] --out CACHE_DIR [--workers N] [--shard i/N]
                [--salt-file F] [--val-fraction 0.1] [--path-map FILE] [--max-voxels N]
                [--decode-timeout S] [--series-timeout S] [--follow-links] [--nifti-modality RULE ...]
                [--allow-secondary] [--keep-missing] [--scan-index FILE] [--quiet]
    medmae prep ARCHIVE_DIR [ARCHIVE_DIR ...] --out CACHE_DIR --scan-only --scan-index FILE [...]  # scan once
    medmae prep dicomweb+https://HOST/dicom-web | dimse://AET@HOST:PORT --out CACHE_DIR [--query KEY=VALUE ...]
                [--uids FILE] [--pacs-credentials FILE] [...]       # pull from a PACS (docs/pacs.md)
    medmae prep merge CACHE_DIR [--shards N] [--quiet]

Exit status 0 when the run completed (rejected files are normal and are counted in the report),
2 with a one-line message when the arguments cannot work (or the cache is in use by another prep,
or was built with another salt), 1 with a one-line message when the machine failed the build (disk
full); a rerun resumes.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from data_prep.nifti_meta import parse_modality_rule
from data_prep.pipeline import PrepError, merge_shards, prep_archive
from data_prep.scan import DEFAULT_MAX_VOXELS
from data_prep.sources import PacsError
from data_prep.sources.options import add_arguments as add_pacs_arguments
from data_prep.sources.options import source_from_args
from data_prep.workers import DEFAULT_DECODE_TIMEOUT, DEFAULT_SERIES_TIMEOUT, BuildWorkerError


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise _UsageError(message)


def _default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def _shard(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"expected i/N (e.g. 0/4), got {text!r}")
    i, n = int(m.group(1)), int(m.group(2))
    if n < 1 or i >= n:
        raise argparse.ArgumentTypeError(f"need 0 <= i < N, got {text!r}")
    return i, n


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def _positive_seconds(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}") from None
    if not v > 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return v


def _fraction(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}") from None
    if not 0.0 <= v < 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}")
    return v


def _nifti_rule(text: str) -> str:
    """Validate a ``--nifti-modality`` rule now, so a typo is a usage error naming the option."""
    try:
        parse_modality_rule(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _prep_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="medmae prep",
        description="Scan DICOM/NIfTI archives and build the de-identified training cache. "
        "Use `medmae prep merge CACHE_DIR` to combine --shard runs.",
    )
    p.add_argument("archives", nargs="+", metavar="ARCHIVE_DIR",
                   help="folders to scan recursively, or one PACS source (dicomweb+https://..., dimse://...)")
    p.add_argument("--out", required=True, type=Path, metavar="CACHE_DIR", help="cache directory (created)")
    p.add_argument("--workers", type=_positive_int, default=_default_workers(),
                   help="processes for scanning and building (default: all available CPUs)")
    p.add_argument("--shard", type=_shard, default=None, metavar="i/N",
                   help="build only part i of N (0-based), e.g. $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT")
    p.add_argument("--salt-file", type=Path, default=None, metavar="F",
                   help="secret key of the pseudonyms, outside the cache (default: CACHE_DIR.salt; created)")
    p.add_argument("--val-fraction", type=_fraction, default=0.1, help="share of patients in 'val' (default 0.1)")
    p.add_argument("--path-map", type=Path, default=None, metavar="FILE",
                   help="also write pseudonym -> archive path JSON here (outside the cache; hospital use only)")
    p.add_argument("--max-voxels", type=_positive_int, default=DEFAULT_MAX_VOXELS, metavar="N",
                   help="reject a file (first NIfTI volume) or series declaring more voxels, before decoding "
                   f"(default {DEFAULT_MAX_VOXELS} = 512x512x1024)")
    p.add_argument("--decode-timeout", type=_positive_seconds, default=DEFAULT_DECODE_TIMEOUT, metavar="S",
                   help="seconds one file may take to decode before it is rejected "
                   f"(default {DEFAULT_DECODE_TIMEOUT:g})")
    p.add_argument("--series-timeout", type=_positive_seconds, default=DEFAULT_SERIES_TIMEOUT, metavar="S",
                   help="seconds of worker time one series may take over all its attempts (each file timed out "
                   "or crashed costs one) before its files are rejected as series_timeout "
                   f"(default {DEFAULT_SERIES_TIMEOUT:g})")
    p.add_argument("--follow-links", action="store_true",
                   help="follow symbolic links to folders outside the archives (default: count them, not followed)")
    p.add_argument("--nifti-modality", type=_nifti_rule, action="append", default=[], metavar="RULE",
                   help="modality of NIfTI files: MOD (every NIfTI) or PATTERN=MOD, PATTERN an fnmatch glob on "
                   "the path in its archive or the absolute path (e.g. '*_ct.nii.gz=CT', '/data/ct/*=CT'); "
                   "repeatable, first match wins; beats the JSON sidecar's Modality and the BIDS suffix")
    p.add_argument("--allow-secondary", action="store_true",
                   help="keep secondary captures and DERIVED\\SECONDARY images not marked BurnedInAnnotation=NO "
                   "(default: reject them as secondary_capture; they often show patient text)")
    p.add_argument("--keep-missing", action="store_true",
                   help="on a rerun, keep series whose files all left the archive in the manifest and cache "
                   "(default: remove them from both)")
    p.add_argument("--scan-only", action="store_true",
                   help="only scan the archives (once, for all shards) and write the scan to --scan-index; "
                   "builds nothing")
    p.add_argument("--scan-index", type=Path, default=None, metavar="FILE",
                   help="with --scan-only, where the scan is written; otherwise read it instead of scanning "
                   "(same archives, salt and scan settings). Holds archive paths and UIDs: a secret like the "
                   "salt, outside the cache and the archives (mode 0600)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_pacs_arguments(p)
    return p


def _merge_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="medmae prep merge", description="Combine the results of `medmae prep --shard i/N` runs.")
    p.add_argument("cache_dir", type=Path, metavar="CACHE_DIR")
    p.add_argument("--shards", type=_positive_int, default=None, metavar="N",
                   help="shard count to merge when results of several counts are present")
    p.add_argument("--quiet", action="store_true", help="print nothing but errors")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    merge = bool(args_list) and args_list[0] == "merge"
    parser = _merge_parser() if merge else _prep_parser()
    try:
        args = parser.parse_args(args_list[1:] if merge else args_list)
    except _UsageError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:  # --help
        return int(e.code or 0)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="medmae prep: %(message)s")
    try:
        if merge:
            summary = merge_shards(args.cache_dir, shards=args.shards)
        else:
            archives, source = source_from_args(args)
            summary = prep_archive(
                archives,
                args.out,
                workers=args.workers,
                salt_file=args.salt_file,
                val_fraction=args.val_fraction,
                shard=args.shard,
                path_map=args.path_map,
                progress=not args.quiet,
                max_voxels=args.max_voxels,
                decode_timeout=args.decode_timeout,
                series_timeout=args.series_timeout,
                follow_links=args.follow_links,
                nifti_modality=args.nifti_modality,
                allow_secondary=args.allow_secondary,
                keep_missing=args.keep_missing,
                source=source,
                scan_only=args.scan_only,
                scan_index=args.scan_index,
            )
    except (PrepError, PacsError) as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    except BuildWorkerError as e:
        print(f"{parser.prog}: error: {e} (rerun to resume)", file=sys.stderr)
        return 1
    if not (merge and args.quiet):
        print(summary.format())
    return 0
