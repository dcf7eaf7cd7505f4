"""Salt handling, keyed pseudonyms, splits and shard assignment."""

from __future__ import annotations

import stat
from pathlib import Path

import numpy as np
import pytest

from data_prep.deid import (
    Pseudonymizer,
    SaltError,
    default_salt_path,
    is_inside,
    load_or_create_salt,
    shard_of,
    split_of,
)


def test_salt_is_created_private_and_reused(tmp_path: Path) -> None:
    path = tmp_path / "cache.salt"
    key = load_or_create_salt(path)
    assert len(key) == 64 and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create_salt(path) == key
    assert list(tmp_path.iterdir()) == [path]  # no temporary left behind


def test_short_salt_is_refused(tmp_path: Path) -> None:
    (tmp_path / "s").write_text("abc")
    with pytest.raises(SaltError):
        load_or_create_salt(tmp_path / "s")


def test_default_salt_lives_beside_the_cache(tmp_path: Path) -> None:
    cache = tmp_path / "data" / "cache"
    assert default_salt_path(cache) == tmp_path / "data" / "cache.salt"
    assert not is_inside(default_salt_path(cache), cache) and is_inside(cache / "x" / "y", cache)


def test_pseudonyms_are_keyed_deterministic_and_domain_separated() -> None:
    a, b = Pseudonymizer(b"k" * 32), Pseudonymizer(b"j" * 32)
    assert a.patient("id:123") == Pseudonymizer(b"k" * 32).patient("id:123")
    assert a.patient("id:123") != b.patient("id:123")
    assert a.patient("x")[1:] != a.series("x")[1:] != a.file("x")[1:]
    assert a.series("x").startswith("s") and len(a.series("x")) == 21
    assert a.fingerprint() != b.fingerprint()


def test_split_fraction_and_shards_are_uniform() -> None:
    p = Pseudonymizer(b"salt" * 8)
    ids = [p.patient(f"id:{i}") for i in range(4000)]
    val = np.mean([split_of(i, 0.1) == "val" for i in ids])
    assert 0.08 < val < 0.12
    assert all(split_of(i, 0.0) == "train" for i in ids[:100])
    counts = np.bincount([shard_of(i, 4) for i in ids], minlength=4)
    assert counts.min() > 850
