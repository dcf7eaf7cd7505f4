"""Export tests build small caches the way tests/data does (the same writer API data_prep uses)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.data.conftest import CacheBuilder


@pytest.fixture
def cache_builder(tmp_path: Path) -> CacheBuilder:
    return CacheBuilder(tmp_path / "cache")
