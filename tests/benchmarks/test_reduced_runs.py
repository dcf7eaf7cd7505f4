"""Every benchmark runs end to end in a reduced mode (``--steps 2``); nothing here asserts a timing."""

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--model", "tiny", "--decoder-dim", "64", "--decoder-depth", "1", "--decoder-heads", "2"]
#: train_step.py at its smallest: 32² images, batch 2, one warm-up and two timed rounds, medmae vs MONAI
STEP_REDUCED = [
    "benchmarks/train_step.py",
    *TINY,
    "--img-size",
    "32",
    "--batch",
    "2",
    "--steps",
    "2",
    "--warmup",
    "1",
    "--threads",
    "1",
    "--no-memory",
    "--peers",
    "medmae,monai",
]


def _run(*args: str, timeout: int = 600) -> str:
    proc = subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def _cells(table_row: str) -> list[str]:
    return [c.strip() for c in table_row.strip().strip("|").split("|")]


def test_train_step_reduced_compares_medmae_with_monai() -> None:
    out = _run(
        *STEP_REDUCED,
    )
    rows = {_cells(line)[0]: _cells(line) for line in out.splitlines() if line.startswith("| m")}
    assert set(rows) == {"model", "medmae", "monai"}
    assert all(float(rows[name][3]) > 0 for name in ("medmae", "monai"))  # img/s median
    assert re.search(r"medmae / monai: \d+\.\d+x images/s", out)
    assert re.search(r"analytic training FLOPs: \d+\.\d+ GFLOP", out)


@pytest.mark.slow
def test_train_step_reduced_compiled_runs_pair_like_with_like() -> None:
    out = _run(
        *STEP_REDUCED,
        "--compile",
    )
    assert re.search(r"medmae\+compile / monai\+compile: \d+\.\d+x", out)
    assert re.search(r"medmae\+compile / medmae: \d+\.\d+x images/s \(compiled vs eager\)", out)


def test_train_step_3d_reduced_compares_medmae_with_monai() -> None:
    tiny3d = ["--model", "tiny", "--decoder-dim", "48", "--decoder-depth", "1", "--decoder-heads", "2"]
    out = _run(
        "benchmarks/train_step.py",
        "--3d",
        *tiny3d,
        *["--img-size", "32", "--batch", "2", "--steps", "2", "--warmup", "1", "--threads", "1", "--no-memory"],
    )
    assert re.search(r"^config : ViT-T/16 .* 32\^3 x 1 ch, batch 2", out, re.M)
    rows = {_cells(line)[0]: _cells(line) for line in out.splitlines() if line.startswith("| m")}
    assert set(rows) == {"model", "medmae", "monai"}  # the 3D default peers (lightly has no 3D MAE)
    assert rows["medmae"][1] == "medmae.models.MaskedAutoencoder3D"
    assert all(math.isfinite(float(rows[name][3])) and float(rows[name][3]) > 0 for name in ("medmae", "monai"))
    ratio = re.search(r"medmae / monai: (\d+\.\d+)x images/s", out)
    assert ratio and math.isfinite(float(ratio.group(1))) and float(ratio.group(1)) > 0


@pytest.mark.slow
def test_train_step_3d_reduced_compiled_runs_pair_like_with_like() -> None:
    out = _run(
        "benchmarks/train_step.py",
        *["--3d", "--model", "tiny", "--decoder-dim", "48", "--decoder-depth", "1", "--decoder-heads", "2"],
        *["--img-size", "32", "--batch", "2", "--steps", "2", "--warmup", "1", "--threads", "1", "--no-memory"],
        "--compile",
    )
    assert re.search(r"medmae\+compile / monai\+compile: \d+\.\d+x", out)
    assert re.search(r"medmae\+compile / medmae: \d+\.\d+x images/s \(compiled vs eager\)", out)


#: loader3d.py at its smallest: 2 volumes of 96x96x56 voxels, 32³ crops at 2 mm, batch 2, 2 timed batches
LOADER3D_REDUCED = [
    *["--volumes", "2", "--size", "96", "--slices", "56", "--crop", "32", "--out-spacing", "2"],
    *["--batch", "2", "--batches", "2", "--baseline-batches", "2", "--warmup", "1", "--repeats", "1"],
]


def _loader3d_rows(out: str) -> dict[str, list[str]]:
    return {_cells(line)[1]: _cells(line) for line in out.splitlines() if line.startswith("| 3D 32^3 |")}


def test_loader3d_reduced_compares_the_datamodule_with_monai(tmp_path: Path) -> None:
    out = _run("benchmarks/loader3d.py", "--work", str(tmp_path), *LOADER3D_REDUCED, "--workers", "0", "1")
    assert "medmae path: CacheDataModule(volume=VolumeOptions(...))" in out
    assert "batch check: monai (2, 1, 32, 32, 32) float32" in out
    assert "batch check: medmae (2, 1, 32, 32, 32) float32" in out
    rows = _loader3d_rows(out)
    assert set(rows) == {"0", "1"}
    for row in rows.values():
        base, ours, speedup, base_cpu, ours_cpu, speedup_cpu = row[2:]
        values = [float(v) for v in (base, ours, base_cpu, ours_cpu)]
        assert all(math.isfinite(v) and v > 0 for v in values)
        assert float(speedup.rstrip("x")) == pytest.approx(values[1] / values[0], rel=0.02, abs=0.06)
        assert float(speedup_cpu.rstrip("x")) == pytest.approx(values[3] / values[2], rel=0.02, abs=0.06)


def test_loader3d_reduced_dataset_path_without_baseline(tmp_path: Path) -> None:
    out = _run(
        "benchmarks/loader3d.py",
        *["--work", str(tmp_path), *LOADER3D_REDUCED, "--workers", "0", "--medmae-path", "dataset", "--no-baseline"],
    )
    assert "medmae path: CacheVolumeDataset + EpochWeightedSampler + DataLoader" in out
    (row,) = _loader3d_rows(out).values()
    assert row[2] == "-" and row[4] == "-" and math.isfinite(float(row[3])) and float(row[3]) > 0


def test_fit_throughput_reduced_reports_a_starvation_ratio(tmp_path: Path) -> None:
    out = _run(
        "benchmarks/fit_throughput.py",
        *TINY,
        "--work",
        str(tmp_path),
        "--series",
        "2",
        "--slices-per-series",
        "8",
        "--img-size",
        "64",
        "--batch",
        "4",
        "--steps",
        "2",
        "--warmup",
        "1",
        "--workers",
        "1",
        "--threads",
        "1",
        "--slices",
        "1",
        "3",
    )
    rows = [line for line in out.splitlines() if line.startswith(("| 2D", "| 2.5D"))]
    assert len(rows) == 2
    for row in rows:
        step_only, fit, ratio = (float(v) for v in _cells(row)[-3:])
        assert step_only > 0 and fit > 0 and ratio == pytest.approx(fit / step_only, abs=0.01)


def test_gpu_script_is_valid_bash_and_refuses_without_cuda(tmp_path: Path) -> None:
    script = ROOT / "benchmarks" / "gpu.sh"
    assert subprocess.run(["bash", "-n", str(script)], check=False).returncode == 0
    if torch.cuda.is_available():
        pytest.fail("this test checks the no-GPU path; on a CUDA machine run benchmarks/gpu.sh itself")
    proc = subprocess.run(["bash", str(script), str(tmp_path / "r.md")], capture_output=True, text=True, check=False)
    assert proc.returncode == 2 and "no CUDA device" in proc.stderr
