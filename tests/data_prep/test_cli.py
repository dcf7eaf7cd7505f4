"""``medmae prep`` / ``python -m data_prep``: exit codes and one-line errors."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from data_prep.cli import main
from tests.data_prep.factory import volume_series
from tests.data_prep.unprivileged import run_unprivileged, world_readable_tmpdir

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def archive(tmp_path: Path) -> Path:
    volume_series(tmp_path / "archive" / "s", n=3, rows=8, cols=8)
    return tmp_path / "archive"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["{tmp}/nope", "--out", "{tmp}/c"], "archive not found"),
        (["{archive}", "--out", "{tmp}/c", "--shard", "3/2"], "need 0 <= i < N"),
        (["{archive}", "--out", "{tmp}/c", "--shard", "x"], "expected i/N"),
        (["{archive}", "--out", "{tmp}/c", "--workers", "0"], "positive integer"),
        (["{archive}", "--out", "{tmp}/c", "--val-fraction", "1.5"], "[0, 1)"),
        (["{archive}", "--out", "{tmp}/c", "--series-timeout", "0"], "positive number of seconds"),
        (["{archive}", "--out", "{archive}/s/IM00000"], "not a directory"),
        (["{archive}"], "--out"),
        (["merge", "{tmp}"], "no shard results"),
    ],
)
def test_unusable_arguments_exit_2_with_one_line(archive: Path, tmp_path: Path, capsys, args, message) -> None:
    argv = [a.format(tmp=tmp_path, archive=archive) for a in args]
    assert main(argv + ["--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and err[0].startswith("medmae prep")


def test_unwritable_cache_dir(archive: Path) -> None:
    work = world_readable_tmpdir()
    try:
        shutil.copytree(archive, work / "archive")
        for p in (work / "archive").rglob("*"):
            p.chmod(0o755 if p.is_dir() else 0o644)
        (work / "ro").mkdir(mode=0o555)

        def prep_into_read_only_folder() -> tuple[int, str]:
            err = io.StringIO()
            with contextlib.redirect_stderr(err):
                code = main([str(work / "archive"), "--out", str(work / "ro" / "c"), "--quiet"])
            return code, err.getvalue()

        code, err = run_unprivileged(prep_into_read_only_folder)
        assert code == 2 and "not writable" in err
    finally:
        shutil.rmtree(work)


def test_medmae_prep_dispatches_here(archive: Path, tmp_path: Path, capsys) -> None:
    from medmae.cli import main as medmae_main

    assert medmae_main(["prep", str(archive), "--out", str(tmp_path / "c"), "--quiet", "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "1 series" in out and "salt:" in out and str(tmp_path / "c.salt") in out
    assert (tmp_path / "c" / "manifest.json").is_file()


def test_python_dash_m(archive: Path, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "data_prep", str(archive), "--out", str(tmp_path / "c"),
                           "--quiet"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "series built: 1" in proc.stdout
