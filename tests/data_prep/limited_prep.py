"""Run ``python -m data_prep`` in a subprocess under an address-space limit and measure its peak RSS.

Memory tests feed prep files built to make a reader allocate gigabytes. The limit
(``RLIMIT_AS``, inherited by prep's forked workers) makes a regression fail the test with a
``MemoryError`` or a killed worker instead of taking the machine's memory; the peak resident set
of prep and all its workers (``RUSAGE_CHILDREN`` of a small parent) is what the test asserts on.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

#: Address space allowed to prep and each of its workers: the interpreter with numpy, pydicom,
#: nibabel and the pylibjpeg plugins needs well under 0.5 GiB of it; a reader allocating gigabytes cannot fit.
ADDRESS_SPACE_LIMIT = 1 << 30

_PARENT = (
    "import resource, subprocess, sys\n"
    "limit = int(sys.argv[1])\n"
    "def limited():\n"
    "    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))\n"
    "rc = subprocess.run(sys.argv[2:], stdout=subprocess.DEVNULL, preexec_fn=limited).returncode\n"
    "print(rc, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)\n"
)


@dataclass
class LimitedRun:
    """Exit status, peak RSS (MiB) of prep and its workers, the reject report and the path map."""

    rc: int
    peak_mib: float
    report: dict
    path_map: dict

    def reason(self, path: Path) -> str | None:
        """The reject reason of a file (None: in a built series)."""
        want = os.path.abspath(path)
        fid = next(f for f, p in self.path_map["files"].items() if p == want)
        return next((e["reason"] for e in self.report["rejected"] if e["id"] == fid), None)


def prep_limited(archive: Path, out: Path, *extra: str, address_space: int = ADDRESS_SPACE_LIMIT,
                 workers: int = 2, timeout: float = 900) -> LimitedRun:
    """``python -m data_prep ARCHIVE --out OUT --workers N --path-map ... EXTRA`` under ``address_space``."""
    path_map = out.parent / f"{out.name}.paths.json"
    cmd = [sys.executable, "-c", _PARENT, str(address_space), sys.executable, "-m", "data_prep", str(archive),
           "--out", str(out), "--workers", str(workers), "--quiet", "--path-map", str(path_map), *extra]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, check=True)
    rc, peak = res.stdout.split()
    report = json.loads((out / "reject_report.json").read_text()) if (out / "reject_report.json").is_file() else {}
    paths = json.loads(path_map.read_text()) if path_map.is_file() else {"files": {}}
    return LimitedRun(int(rc), float(peak), report, paths)
