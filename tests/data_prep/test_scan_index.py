"""``--scan-only`` / ``--scan-index``: one scan shared by every shard, and the same cache bytes as without it."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from data_prep import merge_shards, prep_archive
from data_prep.cli import main
from data_prep.deid import Pseudonymizer
from data_prep.scan import scan_archives
from data_prep.scan_index import INDEX_SETTINGS, read_scan_index, write_scan_index
from tests.data_prep.factory import Identity, enhanced_mr, volume_series
from tests.data_prep.test_resume_and_shards import make_archive

SALT = "5a" * 32  # a fixed salt: the pseudonyms, and so the bytes compared, are reproducible
ODD_NAME = os.fsdecode(b"caf\xe9-\xff")  # a folder name that is not UTF-8


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """DICOM series, an enhanced multi-frame file, junk, a truncated file, an SR, NIfTI with sidecars
    (one built, one rejected at build, one rejected at scan) and a folder whose name is not UTF-8."""
    root = tmp_path_factory.mktemp("scan_index")
    arch = make_archive(root / "archive")
    enhanced_mr(arch / "enh" / "mf", identity=Identity(patient_id="PENH"))
    volume_series(arch / ODD_NAME, n=3, rows=8, cols=8, seed=5, identity=Identity(patient_id="PODD"))
    (arch / "empty").write_bytes(b"")
    salt = root / "salt"
    salt.write_text(SALT)
    salt.chmod(0o600)
    return arch, salt


def _tree(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _sharded(arch: Path, salt: Path, out: Path, path_map: Path, index: Path | None) -> None:
    for i in range(2):
        prep_archive([arch], out, salt_file=salt, shard=(i, 2), path_map=path_map, scan_index=index, progress=False)
    merge_shards(out)


def _no_scan(*args: Any, **kwargs: Any) -> None:
    raise AssertionError("the archive was scanned although a scan index was given")


def test_shards_from_an_index_give_the_same_bytes(archive, tmp_path: Path, monkeypatch, caplog) -> None:
    arch, salt = archive
    _sharded(arch, salt, tmp_path / "plain", tmp_path / "plain-paths.json", None)

    index = tmp_path / "secret" / "scan.jsonl"
    summary = prep_archive([arch], tmp_path / "indexed", salt_file=salt, scan_only=True, scan_index=index,
                           progress=False)
    assert summary.scan_only and summary.scan_index == index and summary.manifest is None
    assert "scan index:" in summary.format()
    assert stat.S_IMODE(index.stat().st_mode) == 0o600
    assert not list(index.parent.glob(".*.tmp"))
    monkeypatch.setattr("data_prep.pipeline.scan_archives", _no_scan)  # the shards must not scan
    caplog.set_level(logging.DEBUG)
    _sharded(arch, salt, tmp_path / "indexed", tmp_path / "indexed-paths.json", index)

    plain, indexed = _tree(tmp_path / "plain"), _tree(tmp_path / "indexed")
    assert sorted(plain) == sorted(indexed)
    assert [name for name in plain if plain[name] != indexed[name]] == []
    assert any(name.startswith("prep_state/shard-") for name in plain)
    for i in range(2):  # the path maps too (they hold paths: the index's absolute paths are the same)
        suffix = f".shard-{i:04d}-of-0002.json"
        assert (tmp_path / f"plain-paths{suffix}").read_bytes() == (tmp_path / f"indexed-paths{suffix}").read_bytes()

    # nothing of the index reaches the cache or the logs: no archive path, no UID
    secrets = set()
    for line in index.read_text("ascii").splitlines()[1:-1]:
        rel, path, _kind, _reason, _is_dir, _nifti_rel, _sidecar, dicom = json.loads(line)
        secrets.add(json.loads(json.dumps(path)).encode("utf-8", "surrogateescape"))
        if dicom is not None:
            secrets.update(uid.encode("ascii") for uid in dicom[1:3])  # SOPInstanceUID, SeriesInstanceUID
    secrets.add(os.fsencode(arch))
    assert len(secrets) > 40
    blob = b"\0".join(indexed.values())
    logged = "\n".join(r.getMessage() for r in caplog.records).encode("utf-8", "surrogateescape")
    assert [s for s in secrets if s in blob or s in logged] == []


def test_a_plain_run_from_an_index_equals_one_that_scans(archive, tmp_path: Path, monkeypatch) -> None:
    arch, salt = archive
    prep_archive([arch], tmp_path / "plain", salt_file=salt, progress=False)
    index = tmp_path / "scan.jsonl"
    assert main([str(arch), "--out", str(tmp_path / "indexed"), "--salt-file", str(salt), "--scan-only",
                 "--scan-index", str(index), "--quiet"]) == 0
    monkeypatch.setattr("data_prep.pipeline.scan_archives", _no_scan)
    assert main([str(arch), "--out", str(tmp_path / "indexed"), "--salt-file", str(salt), "--scan-index", str(index),
                 "--workers", "2", "--quiet"]) == 0
    assert _tree(tmp_path / "plain") == _tree(tmp_path / "indexed")


def _typed(x: Any) -> Any:
    """A value with every type spelled out (1 vs 1.0 vs True, tuple vs list, -0.0 vs 0.0)."""
    if dataclasses.is_dataclass(x):
        return (type(x).__name__, tuple(_typed(getattr(x, f.name)) for f in dataclasses.fields(x)))
    if isinstance(x, tuple | list):
        return (type(x).__name__, tuple(_typed(e) for e in x))
    if isinstance(x, float):
        return ("float", x.hex() if x == x else "nan")
    return (type(x).__name__, x)


def test_records_read_back_are_the_scanned_ones(archive, tmp_path: Path) -> None:
    arch, _ = archive
    pseudo = Pseudonymizer(bytes.fromhex(SALT))
    records = scan_archives([arch])
    index = tmp_path / "scan.jsonl"
    settings = dict.fromkeys(INDEX_SETTINGS, "x")
    write_scan_index(index, records, settings, pseudo)
    back = read_scan_index(index, settings, pseudo)
    assert [dataclasses.replace(r, path=os.path.abspath(r.path)) for r in records] == back
    assert [_typed(dataclasses.replace(r, path=os.path.abspath(r.path))) for r in records] == [_typed(r) for r in back]
    assert any(r.dicom is not None and len(r.dicom.frames) > 1 for r in back)  # the enhanced file
    assert any(r.sidecar is not None for r in back) and any(r.is_directory is False and r.reason for r in back)
    # repeated values are shared again, as in the scan (memory stays as in the compact scan)
    series = [r.dicom for r in back if r.dicom is not None and r.dicom.modality == "CT"]
    assert len({id(h.series_uid) for h in series}) == len({h.series_uid for h in series})


@pytest.fixture
def written(archive, tmp_path: Path) -> tuple[Path, Path, Path, Path]:
    arch, salt = archive
    out, index = tmp_path / "cache", tmp_path / "scan.jsonl"
    prep_archive([arch], out, salt_file=salt, scan_only=True, scan_index=index, progress=False)
    return arch, salt, out, index


def _refused(arch: Path, out: Path, salt: Path, index: Path, capsys, *extra: str) -> str:
    """Run the CLI with the index; -> its one-line error (exit 2, no traceback)."""
    capsys.readouterr()
    rc = main([str(arch), "--out", str(out), "--salt-file", str(salt), "--scan-index", str(index), "--quiet", *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


def test_an_index_of_another_salt_or_settings_is_refused(written, tmp_path: Path, capsys) -> None:
    arch, salt, out, index = written
    other = tmp_path / "other.salt"
    other.write_text("c3" * 32)
    assert "another salt" in _refused(arch, tmp_path / "c2", other, index, capsys)
    assert "another salt" in _refused(arch, tmp_path / "c2", tmp_path / "absent.salt", index, capsys)
    assert not (tmp_path / "c2").exists() and not (tmp_path / "absent.salt").exists()  # refused before writing
    assert "another --max-voxels" in _refused(arch, out, salt, index, capsys, "--max-voxels", "1000")
    assert "another --allow-secondary" in _refused(arch, out, salt, index, capsys, "--allow-secondary")
    assert "other --nifti-modality" in _refused(arch, out, salt, index, capsys, "--nifti-modality", "CT")
    assert "other archives" in _refused(arch / "s0", out, salt, index, capsys)
    assert str(index) in _refused(arch, out, salt, index, capsys, "--follow-links")
    assert not (out / "manifest.json").exists()  # refused before anything was built


def test_a_damaged_index_is_refused_with_one_line(written, tmp_path: Path, capsys) -> None:
    arch, salt, out, index = written
    lines = index.read_bytes().splitlines(keepends=True)
    damaged = tmp_path / "damaged.jsonl"

    def refused(data: bytes) -> str:
        damaged.write_bytes(data)
        message = _refused(arch, out, salt, damaged, capsys)
        assert str(damaged) in message
        return message

    edited = lines[3].replace(b"/", b"/x", 1)  # still valid JSON: the check value tells
    assert "changed after it was written" in refused(b"".join(lines[:3] + [edited] + lines[4:]))
    assert "changed after it was written" in refused(b"".join(lines[:3] + lines[4:]))  # a line removed
    assert "line 4 is malformed" in refused(b"".join(lines[:3] + [b"{oops\n"] + lines[4:]))
    assert "truncated" in refused(b"".join(lines[:5]) + lines[5][:20])  # cut inside a line
    assert "truncated" in refused(b"".join(lines[:-1]))  # cut at a line end: no end line
    assert "not a medmae scan index" in refused(b"[1, 2]\n")
    assert "empty" in refused(b"")
    assert not (out / "manifest.json").exists()


def test_where_the_index_may_live(written, tmp_path: Path, capsys) -> None:
    arch, salt, out, index = written
    assert "outside the cache" in _refused(arch, out, salt, out / "scan.jsonl", capsys, "--scan-only")
    assert "outside the archives" in _refused(arch, out, salt, arch / "scan.jsonl", capsys, "--scan-only")
    assert not (arch / "scan.jsonl").exists()
    assert "salt file" in _refused(arch, out, salt, salt, capsys, "--scan-only")
    assert salt.read_text() == SALT
    assert "not found" in _refused(arch, out, salt, tmp_path / "none.jsonl", capsys)
    assert "--scan-only scans for all shards" in _refused(arch, out, salt, index, capsys, "--scan-only", "--shard",
                                                         "0/2")
    assert "--path-map" in _refused(arch, out, salt, index, capsys, "--scan-only", "--path-map",
                                    str(tmp_path / "p.json"))
    capsys.readouterr()
    assert main([str(arch), "--out", str(out), "--salt-file", str(salt), "--scan-only", "--quiet"]) == 2
    assert "--scan-only needs --scan-index" in capsys.readouterr().err
    for pacs in ("dicomweb+https://pacs.invalid/dicom-web", "dimse://AE@pacs.invalid:104"):  # out of scope
        assert main([pacs, "--out", str(out), "--scan-only", "--scan-index", str(tmp_path / "p.jsonl"), "--quiet"]) == 2
        assert "PACS source is not supported" in capsys.readouterr().err


def test_a_file_removed_after_the_scan_is_rejected_by_the_build(tmp_path: Path) -> None:
    arch = tmp_path / "archive"
    volume_series(arch / "a", n=4, rows=8, cols=8, seed=1, identity=Identity(patient_id="PA"))
    gone = volume_series(arch / "b", n=4, rows=8, cols=8, seed=2, identity=Identity(patient_id="PB")).paths[-1]
    index, salt = tmp_path / "scan.jsonl", tmp_path / "salt"
    prep_archive([arch], tmp_path / "cache", salt_file=salt, scan_only=True, scan_index=index, progress=False)
    gone.unlink()  # the index is a snapshot: the build opens the file and rejects it
    (arch / "new").write_text("added after the scan")  # not seen
    summary = prep_archive([arch], tmp_path / "cache", salt_file=salt, scan_index=index, progress=False)
    assert summary.files_seen == 8 and summary.series_built == 2
    assert summary.rejects == {"pixel_decode_failed": 1}
