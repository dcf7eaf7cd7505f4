"""Issue 8.4: one cache, one writer. A second prep into a cache in use fails fast; a salt that is
not a file fails before anything is created; a rerun with another salt is refused (the manifest
records the salt's fingerprint); a salt that every user can read is warned about."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from data_prep import PrepError, prep_archive
from data_prep.cli import main
from data_prep.deid import Pseudonymizer
from medmae.data.cache import load_manifest
from tests.data_prep.factory import volume_series

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def archive(tmp_path: Path) -> Path:
    volume_series(tmp_path / "archive" / "ct", n=3)
    return tmp_path / "archive"


class Holder:
    """Another process holding the cache's lock the way a running prep does (data_prep.lock)."""

    def __init__(self, cache: Path, shard: tuple[int, int] | None = None) -> None:
        code = (
            "import sys, time\n"
            "from pathlib import Path\n"
            "from data_prep.lock import cache_lock\n"
            f"with cache_lock(Path({str(cache)!r}), {shard!r}):\n"
            "    print('locked', flush=True)\n"
            "    time.sleep(120)\n"
        )
        self.proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None and self.proc.stdout.readline().strip() == "locked"

    def release(self) -> None:
        self.proc.kill()
        self.proc.wait()


def test_second_prep_fails_fast_while_the_cache_is_in_use(archive: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "cache"
    holder = Holder(out)
    try:
        assert main([str(archive), "--out", str(out), "--quiet"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "in use by another `medmae prep`" in err[0]
        assert not (out / "manifest.json").exists() and not list(out.glob("series/*"))
    finally:
        holder.release()
    assert main([str(archive), "--out", str(out), "--quiet"]) == 0  # the lock died with its holder


def test_two_real_preps_into_one_cache(archive: Path, tmp_path: Path) -> None:
    """Two real runs started together: one builds, the other fails fast; the manifest holds every series."""
    out, salt = tmp_path / "cache", tmp_path / "s.salt"
    prep_archive([archive], tmp_path / "warm", salt_file=salt, progress=False)  # creates the salt
    cmd = [sys.executable, "-m", "data_prep", str(archive), "--out", str(out), "--salt-file", str(salt), "--quiet"]
    procs = [subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [(p.wait(timeout=120), p.stderr.read()) for p in procs]  # type: ignore[union-attr]
    assert sorted(rc for rc, _ in results) in ([0, 0], [0, 2])  # a loser says so; both may win in turn
    for rc, err in results:
        if rc == 2:
            assert "in use by another" in err and len(err.strip().splitlines()) == 1
    built = {p.stem for p in (out / "series").glob("*.json")}
    assert {r.series_id for r in load_manifest(out).rows} == built and len(built) == 1


def test_shards_share_the_cache_but_not_a_shard(archive: Path, tmp_path: Path) -> None:
    out, salt = tmp_path / "cache", tmp_path / "s.salt"
    holder = Holder(out, (0, 2))
    try:
        prep_archive([archive], out, salt_file=salt, shard=(1, 2), progress=False)  # another shard: fine
        with pytest.raises(PrepError, match="shard 0/2 .* already being built"):
            prep_archive([archive], out, salt_file=salt, shard=(0, 2), progress=False)
        with pytest.raises(PrepError, match="in use by another"):
            prep_archive([archive], out, salt_file=salt, progress=False)  # a plain run next to shards
    finally:
        holder.release()


def test_salt_file_that_is_a_directory_fails_before_anything_is_created(archive: Path, tmp_path: Path,
                                                                       capsys) -> None:
    (tmp_path / "saltdir").mkdir()
    out = tmp_path / "new" / "cache"
    assert main([str(archive), "--out", str(out), "--salt-file", str(tmp_path / "saltdir"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a regular file" in err[0]
    assert not (tmp_path / "new").exists()


def test_rerun_with_another_salt_is_refused(archive: Path, tmp_path: Path, capsys) -> None:
    out, salt_a, salt_b = tmp_path / "cache", tmp_path / "a.salt", tmp_path / "b.salt"
    prep_archive([archive], out, salt_file=salt_a, progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["salt_fingerprint"] == Pseudonymizer(salt_a.read_bytes().strip()).fingerprint()
    assert salt_a.read_text().strip() not in (out / "manifest.json").read_text()
    before = sorted(p.name for p in out.rglob("*"))

    salt_b.write_text(os.urandom(32).hex() + "\n")
    salt_b.chmod(0o600)
    assert main([str(archive), "--out", str(out), "--salt-file", str(salt_b), "--quiet"]) == 2
    assert main([str(archive), "--out", str(out), "--quiet"]) == 2  # the default salt is absent: not created
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "another salt" in err[0] and "salt that is not at" in err[1]
    assert not (tmp_path / "cache.salt").exists()
    assert sorted(p.name for p in out.rglob("*")) == before

    # a first run killed before its manifest still recorded its salt
    (out / "manifest.json").unlink()
    with pytest.raises(PrepError, match="another salt"):
        prep_archive([archive], out, salt_file=salt_b, progress=False)
    prep_archive([archive], out, salt_file=salt_a, progress=False)  # the right salt resumes
    assert json.loads((out / "manifest.json").read_text()) == manifest


def test_world_readable_salt_is_warned_about(archive: Path, tmp_path: Path, caplog) -> None:
    salt = tmp_path / "s.salt"
    caplog.set_level(logging.WARNING, logger="data_prep")
    prep_archive([archive], tmp_path / "c1", salt_file=salt, progress=False)  # created 0600
    assert "readable by every user" not in caplog.text
    os.chmod(salt, 0o644)
    prep_archive([archive], tmp_path / "c2", salt_file=salt, progress=False)
    assert "readable by every user" in caplog.text and "chmod 600" in caplog.text
