import subprocess
import sys

import pytest

from medmae.cli import main


def test_help_lists_every_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("prep", "fit", "validate", "export", "demo"):
        assert f"  {command} " in out


def test_unknown_command_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["pretrain"]) == 2
    assert "unknown command 'pretrain'" in capsys.readouterr().err


def test_console_script_is_installed() -> None:
    out = subprocess.run([sys.executable, "-m", "medmae.cli", "--help"], capture_output=True, text=True, check=True)
    assert "medmae <command>" in out.stdout
