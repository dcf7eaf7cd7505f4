"""The pytest fixtures of the PACS-source tests (registered with ``pytest_plugins``): a real Orthanc
per test, and the credentials file for it. The server itself is :class:`tests.data_prep.orthanc.Orthanc`."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.data_prep.orthanc import PASSWORD, Orthanc


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[Orthanc]:
    """A running Orthanc, empty; stopped (SIGKILL) after the test."""
    server = Orthanc(tmp_path / "orthanc").start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def credentials(tmp_path: Path) -> Path:
    """The password file ``--pacs-credentials`` reads (mode 0600)."""
    path = tmp_path / "pacs.credentials"
    path.write_text(PASSWORD + "\n")
    path.chmod(0o600)
    return path
