"""Planted identifiers must not appear in any byte prep writes, prints or logs."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from data_prep.cli import main
from tests.data_prep.factory import (
    BASIC_TEXT_SR,
    Identity,
    cr_image,
    non_image,
    truncate,
    volume_series,
    write_nifti,
    write_sidecar,
)

NEEDLES = {
    "patient_name": "Quixotic^Zebulon",
    "patient_id": "PID8675309QX",
    "birth_date": "19230417",
    "study_date": "19870523",
    "accession": "ACC77XQZ",
    "institution": "St Quintessa Infirmary",
    "station": "STNQZ9",
    "description": "DESCQZLUNGS",
    "private_value": "PRIVQZSECRET",
}
FOLDER = "Folder_Zebulon_Quixotic_4411"


def _haystack_hits(blob: bytes, needles: list[str]) -> list[str]:
    hits = []
    for n in needles:
        for enc in ("utf-8", "utf-16-le", "utf-16-be"):
            if n.encode(enc) in blob:
                hits.append(f"{n!r} ({enc})")
    return hits


@pytest.fixture
def planted(tmp_path: Path) -> tuple[Path, list[str]]:
    ident = Identity(**NEEDLES)
    root = tmp_path / "archive" / FOLDER
    uids: list[str] = [ident.study_uid]
    ct = volume_series(root / f"ct_{FOLDER}", n=4, identity=ident)
    mr = volume_series(root / "mr", n=3, modality="MR", intercept=0, identity=ident, name=lambda k: f"{FOLDER}_{k}")
    truncate(volume_series(root / "trunc", n=4, identity=ident).paths[3])  # dropped slice -> prep_state
    cr = cr_image(root / "cr" / FOLDER, identity=ident)
    non_image(root / "sr" / FOLDER, BASIC_TEXT_SR, "SR", identity=ident)
    t1 = write_nifti(root / f"sub-{FOLDER}" / "anat" / f"sub-{FOLDER}_T1w.nii.gz", np.zeros((4, 4, 3), np.int16))
    # a dcm2niix-style sidecar full of identity (and a Modality that --nifti-modality contradicts: a warning)
    write_sidecar(t1, {"Modality": "MR", "PatientName": NEEDLES["patient_name"], "PatientID": NEEDLES["patient_id"],
                       "AcquisitionDateTime": NEEDLES["study_date"], "InstitutionName": NEEDLES["institution"],
                       "StationName": NEEDLES["station"], "SeriesDescription": NEEDLES["description"]})
    broken = write_nifti(root / "nifti" / f"{FOLDER}.nii", np.ones((4, 4, 3), np.int16))
    write_sidecar(broken, ('{"PatientName": "' + NEEDLES["patient_name"] + '", ').encode())  # invalid: a warning
    for s in (ct, mr, cr):
        uids += [s.series_uid, *s.sop_uids]
    (root / "junk").mkdir()
    (root / "junk" / f"{FOLDER}.txt").write_text("x")
    needles = list(NEEDLES.values()) + ["Quixotic", "Zebulon", FOLDER, str(tmp_path / "archive")] + uids
    return tmp_path / "archive", needles


def test_no_identifier_in_any_output(planted, tmp_path: Path, capsys, caplog) -> None:
    archive, needles = planted
    caplog.set_level(logging.DEBUG)
    out = tmp_path / "out" / "cache"
    path_map = tmp_path / "hospital" / "paths.json"
    rule = ["--nifti-modality", f"{archive}/{FOLDER}/sub-*=CT"]  # a rule holding archive paths
    assert main([str(archive), "--out", str(out), "--workers", "1", "--path-map", str(path_map), *rule]) == 0
    assert main([str(archive), "--out", str(out), "--workers", "1", *rule]) == 0  # a resumed run too
    assert main([str(archive), "--out", str(out.parent / "sharded"), "--workers", "1", "--shard", "0/1",
                 *rule]) == 0  # a shard result records its settings
    captured = capsys.readouterr()
    assert "--nifti-modality says CT, its JSON sidecar says MR" in caplog.text
    assert "its JSON sidecar is ignored in part or whole: not valid JSON" in caplog.text

    sample = next(p for p in archive.rglob("*") if p.is_file() and p.parent.name.startswith("ct_"))
    assert len(_haystack_hits(sample.read_bytes(), needles)) >= 8  # the needles are really planted

    written = [p for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert any(p.name == "manifest.json" for p in written) and any(p.suffix == ".npy" for p in written)
    assert any("prep_state" in p.parts for p in written)  # the dropped-slice bookkeeping is checked too
    assert any(p.name.startswith("shard-") for p in written)
    assert '"modality_source": "option"' in (out / "manifest.json").read_text()  # the rule was applied
    for p in written:  # the cache, its sidecars, report, state and the salt beside it
        assert _haystack_hits(p.read_bytes(), needles) == [], p.name
    assert _haystack_hits(captured.out.encode() + captured.err.encode(), needles) == []
    assert _haystack_hits(caplog.text.encode(), needles) == []
    # the path map, explicitly requested and outside the cache, is the one place paths live
    assert FOLDER in path_map.read_text()


def test_path_map_and_salt_refused_inside_the_cache(planted, tmp_path: Path, capsys) -> None:
    archive, _ = planted
    out = tmp_path / "cache"
    assert main([str(archive), "--out", str(out), "--path-map", str(out / "map.json"), "--quiet"]) == 2
    assert main([str(archive), "--out", str(out), "--salt-file", str(out / "s.salt"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "outside the cache" in err[0] and "outside the cache" in err[1]
    assert not (out / "manifest.json").exists()


def test_pseudonyms_depend_on_the_salt(planted, tmp_path: Path) -> None:
    archive, _ = planted
    from data_prep import prep_archive

    ids = []
    for name in ("a", "b"):
        prep_archive([archive], tmp_path / name / "cache", progress=False)
        ids.append((tmp_path / name / "cache" / "manifest.json").read_text())
    assert ids[0] != ids[1]  # different salts: unlinkable caches
    shutil.copy(tmp_path / "a" / "cache.salt", tmp_path / "c.salt")
    prep_archive([archive], tmp_path / "c" / "cache", salt_file=tmp_path / "c.salt", progress=False)
    assert (tmp_path / "c" / "cache" / "manifest.json").read_text() == ids[0]
