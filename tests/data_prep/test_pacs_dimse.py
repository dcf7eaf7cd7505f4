"""Prep from a real Orthanc over DIMSE: C-FIND for the headers, C-GET (no listening port) or C-MOVE to
our own SCP for the instances; the same cache as from files, and one-line errors."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from data_prep import prep_archive
from data_prep.cli import main
from data_prep.sources import PacsError, open_source
from medmae.data.cache import REJECT_REPORT_NAME
from tests.data_prep.factory import Identity, volume_series
from tests.data_prep.orthanc import (
    AE_TITLE,
    MOVE_AE,
    Orthanc,
    build_archive,
    cache_bytes,
    dicom_files_under,
    free_port,
    load,
)
from tests.data_prep.test_privacy import NEEDLES, _haystack_hits

pytest_plugins = ("tests.data_prep.orthanc_fixtures",)  # orthanc, credentials


def _counts(cache: Path) -> dict[str, int]:
    return json.loads((cache / REJECT_REPORT_NAME).read_text())["counts"]


def test_c_get_pull_equals_files(orthanc: Orthanc, tmp_path: Path) -> None:
    archive = build_archive(tmp_path / "written")
    load(orthanc, archive, tmp_path / "files")
    salt = tmp_path / "salt"
    from_files = prep_archive([tmp_path / "files"], tmp_path / "from_files", salt_file=salt, progress=False)
    pulled = prep_archive([], tmp_path / "pulled", salt_file=salt, progress=False, workers=2,
                          source=open_source(orthanc.dimse, rate=200))
    assert pulled.series_in_manifest == from_files.series_in_manifest >= 8  # the enhanced MR included
    assert cache_bytes(tmp_path / "pulled") == cache_bytes(tmp_path / "from_files")
    assert _counts(tmp_path / "pulled") == _counts(tmp_path / "from_files")
    assert pulled.files_seen == from_files.files_seen
    assert dicom_files_under(tmp_path, skip=(tmp_path / "written", tmp_path / "files", orthanc.root)) == []


def test_c_move_to_our_scp_equals_files(orthanc: Orthanc, tmp_path: Path) -> None:
    archive = build_archive(tmp_path / "written", hostile=False)
    load(orthanc, archive, tmp_path / "files")
    salt = tmp_path / "salt"
    prep_archive([tmp_path / "files"], tmp_path / "from_files", salt_file=salt, progress=False)
    source = open_source(orthanc.dimse, retrieve="move", move_aet=MOVE_AE, move_port=orthanc.move_port, rate=200)
    assert source.connections == 1  # one port receives
    prep_archive([], tmp_path / "pulled", salt_file=salt, progress=False, workers=2, source=source)
    assert cache_bytes(tmp_path / "pulled") == cache_bytes(tmp_path / "from_files")
    assert _counts(tmp_path / "pulled") == _counts(tmp_path / "from_files")


def test_dimse_query_selects_what_it_says(orthanc: Orthanc, tmp_path: Path) -> None:
    early, late = Identity(study_date="20200102"), Identity(study_date="20240615", patient_id="PAT-0002")
    volume_series(tmp_path / "a" / "ct_early", n=3, identity=early)
    volume_series(tmp_path / "a" / "mr_early", n=2, modality="MR", intercept=0, identity=early, seed=1)
    late_ct = volume_series(tmp_path / "a" / "ct_late", n=4, identity=late, seed=2)
    orthanc.upload_tree(tmp_path / "a")

    def pulled(name: str, **kw: object) -> tuple[int, int]:
        s = prep_archive([], tmp_path / name, progress=False, salt_file=tmp_path / "salt",
                         source=open_source(orthanc.dimse, rate=200, **kw))
        return s.files_seen, s.series_in_manifest

    assert pulled("ct", query=["Modality=CT"]) == (7, 2)
    assert pulled("ct2024", query=["Modality=CT", "StudyDate=20240101-20241231"]) == (4, 1)
    uids = tmp_path / "uids.txt"
    uids.write_text(late_ct.series_uid + "\n")
    assert pulled("uids", uids_file=uids) == (4, 1)


def test_dimse_errors_are_one_line(orthanc: Orthanc, tmp_path: Path, capsys) -> None:
    out = ["--out", str(tmp_path / "cache"), "--quiet"]

    def one_line(argv: list[str]) -> str:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        return err

    dead = f"dimse://{AE_TITLE}@127.0.0.1:{free_port()}"
    err = one_line([dead, "--pacs-retries", "1", "--pacs-timeout", "2", *out])
    assert "unreachable" in err and dead in err
    err = one_line([orthanc.dimse.replace(AE_TITLE, "NOTTHEPACS"), *out])
    assert "rejected the association" in err and "MEDMAE" in err
    err = one_line(["dimse://127.0.0.1:104", *out])
    assert "dimse://AET@host:port" in err
    err = one_line([orthanc.dimse, "--retrieve", "move", *out])
    assert "--move-port" in err
    with pytest.raises(PacsError, match="no credentials"):
        open_source(orthanc.dimse, credentials_file=tmp_path / "x")


def test_dimse_no_identifier_in_any_output(orthanc: Orthanc, tmp_path: Path, capsys, caplog, monkeypatch) -> None:
    ident = Identity(**NEEDLES)
    archive = build_archive(tmp_path / "written", ident, hostile=False)
    load(orthanc, archive, tmp_path / "files")
    uids = [ident.study_uid] + [u for s in archive.series.values() for u in (s.series_uid, *s.sop_uids)]
    needles = list(NEEDLES.values()) + ["Quixotic", "Zebulon"] + uids
    private_tmp = tmp_path / "tmpdir"
    private_tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(private_tmp))
    caplog.set_level(logging.DEBUG)
    out = tmp_path / "out" / "cache"
    for extra in ([], ["--retrieve", "move", "--move-aet", MOVE_AE, "--move-port", str(orthanc.move_port)]):
        assert main([orthanc.dimse, "--out", str(out), "--workers", "2", "--pacs-rate", "200", *extra]) == 0
        out = tmp_path / "out" / "moved"
    captured = capsys.readouterr()
    written = [p for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert sum(p.suffix == ".npy" for p in written) >= 8
    for p in written:
        assert _haystack_hits(p.read_bytes(), needles) == [], p.name
    assert _haystack_hits(captured.out.encode() + captured.err.encode() + caplog.text.encode(), needles) == []
    assert dicom_files_under(tmp_path, skip=(tmp_path / "written", tmp_path / "files", orthanc.root)) == []
    assert list(private_tmp.iterdir()) == []
