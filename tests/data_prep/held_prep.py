"""``python -m tests.data_prep.held_prep ARGS``: ``medmae prep ARGS`` that stalls once a series is built.

For kill-from-outside tests: the first series completes (array and sidecar written), then every
further DICOM decode waits (a minute at most), so a SIGKILL sent after the first sidecar appears
lands mid-build however fast the machine is. Test-only: production code has no hook for it.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import data_prep.build
from data_prep.cli import main

#: The longest a decode waits; the test kills the run long before.
HOLD_SECONDS = 60.0


def held(read: Callable[..., Any], series_dir: Path) -> Callable[..., Any]:
    """``read`` (``read_dicom_frames``), waiting first while ``series_dir`` holds a sidecar."""

    def read_when_released(path: str, *args: Any) -> Any:
        deadline = time.monotonic() + HOLD_SECONDS
        while any(series_dir.glob("*.json")) and time.monotonic() < deadline:
            time.sleep(0.02)
        return read(path, *args)

    return read_when_released


if __name__ == "__main__":
    argv = sys.argv[1:]
    out = Path(argv[argv.index("--out") + 1])
    # forked build workers inherit the patched module attribute
    data_prep.build.read_dicom_frames = held(data_prep.build.read_dicom_frames, out / "series")
    sys.exit(main(argv))
