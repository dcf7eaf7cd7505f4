"""``medmae export``: one safe load, one-line errors for files that are not checkpoints."""

import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from medmae.export import CheckpointError, read_checkpoint
from medmae.export.cli import main


class _Planted:
    """Unpickling this runs code: a checkpoint must never be able to do that to `medmae export`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (Path.write_text, (self.marker, "ran"))


def test_a_checkpoint_carrying_code_is_refused_not_run(tmp_path: Path) -> None:
    marker = tmp_path / "planted_code_ran"
    ckpt = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"variant": "x"}, "payload": _Planted(marker)}, ckpt)
    with pytest.raises(CheckpointError, match="evil.ckpt: not a loadable medmae checkpoint"):
        read_checkpoint(ckpt)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"not a checkpoint at all", "not a loadable medmae checkpoint"),
        (None, "not a Lightning checkpoint"),
    ],
)
def test_non_checkpoint_files_give_one_line(tmp_path: Path, capsys, content: bytes | None, message: str) -> None:
    path = tmp_path / "file.ckpt"
    if content is None:
        torch.save({"weights": torch.zeros(2)}, path)
    else:
        path.write_bytes(content)
    with pytest.raises(SystemExit) as done:
        main([str(path), "--out", str(tmp_path / "out")])
    assert done.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) <= 3


def test_out_that_is_a_file_is_refused_before_loading(tmp_path: Path, capsys) -> None:
    ckpt = tmp_path / "x.ckpt"
    ckpt.write_bytes(pickle.dumps({}))
    out = tmp_path / "out"
    out.write_text("I am a file")
    with pytest.raises(SystemExit):
        main([str(ckpt), "--out", str(out)])
    assert "is a file" in capsys.readouterr().err


def test_medmae_export_cli_process_prints_no_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "junk.ckpt"
    bad.write_bytes(b"\x00" * 64)
    done = subprocess.run(
        [sys.executable, "-m", "medmae.cli", "export", str(bad), "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr and "junk.ckpt" in done.stderr
