"""``benchmarks/archive_scale.py`` in its reduced mode (10^3 files): every stage runs and is reported.

No timing is asserted; the archive's make-up and the table's shape are.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))


def test_generated_archive_has_junk_duplicates_and_many_series(tmp_path: Path) -> None:
    from archive_scale import generate_archive

    counts = generate_archive(tmp_path / "a", 400)
    files = [p for p in (tmp_path / "a").rglob("*") if p.is_file()]
    assert len(files) == 400 == counts["dicom"] + counts["junk"] + counts["duplicates"]
    assert counts["junk"] >= 0.01 * 400 and counts["duplicates"] >= 1 and counts["series"] >= 3


@pytest.mark.slow
def test_archive_scale_reduced_reports_every_stage(tmp_path: Path) -> None:
    from archive_scale import STAGES

    proc = subprocess.run([sys.executable, "benchmarks/archive_scale.py", "--sizes", "1000", "--series", "1000",
                           "--keep", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    files_table, series_table = proc.stdout.split("| stage | series S")
    stages = [line.split("|")[1].strip() for line in files_table.splitlines() if "| 1,000 |" in line]
    assert stages == list(STAGES)
    series_stages = [line.split("|")[1].strip() for line in series_table.splitlines() if "| 1,000 |" in line]
    assert series_stages == ["manifest write", "manifest read", "setup", "first batch", "loader worker"]
    assert "machine:" in proc.stdout and "S = 1,000: manifest" in proc.stdout
