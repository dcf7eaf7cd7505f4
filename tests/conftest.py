"""Fixtures shared across test packages."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from data_prep import prep_archive
from medmae.demo import sample_archives


@pytest.fixture(scope="session")
def sample_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache built by data_prep from the real sample scans bundled with pydicom and nibabel."""
    work = tmp_path_factory.mktemp("sample_cache")
    prep_archive(sample_archives(), work / "cache", workers=1, salt_file=work / "salt", progress=False)
    return work / "cache"


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny tensors gain nothing from intra-op threads; on a shared 2-core machine they stall.

    Use per module: ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
