"""Issue 9: a NIfTI's modality comes from ``--nifti-modality``, its JSON sidecar, its BIDS suffix or
``OT`` (in that order), is recorded with its source, and the sidecar file is accounted with its NIfTI."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest

from data_prep import PrepError, Reason, merge_shards, prep_archive
from data_prep.cli import main
from data_prep.nifti_meta import (
    SIDECAR_MAX_BYTES,
    ModalityRule,
    NiftiSidecar,
    nifti_modality,
    nifti_of_sidecar,
    parse_modality_rule,
    read_sidecar,
    sidecar_of_nifti,
)
from medmae.data.cache import read_sidecar as read_series_sidecar
from tests.data_prep.factory import write_nifti, write_sidecar

HU = np.arange(-1000, 1000, 25, dtype=np.int16).reshape(4, 5, 4)  # 80 voxels of air to bone


# ----------------------------------------------------------------------------- rules and decision


@pytest.mark.parametrize(
    ("text", "pattern", "modality"),
    [("CT", None, "CT"), ("*_ct.nii.gz=CT", "*_ct.nii.gz", "CT"), ("a=b/*=PT", "a=b/*", "PT"),
     ("x=RTDOSE", "x", "RTDOSE")],
)
def test_rules_parse(text: str, pattern: str | None, modality: str) -> None:
    rule = parse_modality_rule(text)
    assert (rule.pattern, rule.modality, rule.text) == (pattern, modality, text)


@pytest.mark.parametrize("text", ["ct", "=CT", "*.nii=", "C T", "CT-1", "ABCDEFGHIJKLMNOPQ", ""])
def test_rules_refuse_what_is_not_a_modality_code(text: str) -> None:
    with pytest.raises(ValueError):
        parse_modality_rule(text)
    with pytest.raises(PrepError, match="^--nifti-modality "):
        prep_archive([Path(".")], Path("/nonexistent/cache"), nifti_modality=[text])


def test_first_matching_rule_wins_on_the_archive_path_or_the_absolute_one() -> None:
    rules = [parse_modality_rule(t) for t in ("/data/pet/*=PT", "*_ct.nii.gz=CT", "MR")]
    assert nifti_modality("0/a/x_ct.nii.gz", "/data/pet/a/x_ct.nii.gz", None, rules).modality == "PT"
    assert nifti_modality("1/a/x_ct.nii.gz", "/elsewhere/a/x_ct.nii.gz", None, rules).modality == "CT"
    assert nifti_modality("1/a/x.nii", "/elsewhere/a/x.nii", None, rules).modality == "MR"
    # the archive index of the rel is not part of the path a pattern sees
    assert not ModalityRule("0/*", "CT").matches("a/x.nii", "/elsewhere/a/x.nii")


@pytest.mark.parametrize(
    ("rules", "sidecar", "name", "expected"),
    [
        (["CT"], "MR", "sub-1_T1w.nii.gz", ("CT", "option", "MR")),  # the option beats everything; warned
        (["CT"], "CT", "x.nii", ("CT", "option", None)),  # agreeing: nothing to warn about
        ([], "CT", "sub-1_T1w.nii.gz", ("CT", "sidecar", None)),  # the sidecar beats the BIDS suffix
        ([], None, "sub-1_T1w.nii.gz", ("MR", "bids_suffix", None)),
        ([], None, "x.nii", ("OT", "default", None)),
        (["*_ct.nii=CT"], None, "x.nii", ("OT", "default", None)),  # a rule that does not match
    ],
)
def test_precedence_option_sidecar_bids_suffix_default(rules, sidecar, name, expected) -> None:
    info = NiftiSidecar(modality=sidecar) if sidecar else None
    d = nifti_modality(f"0/{name}", f"/a/{name}", info, [parse_modality_rule(r) for r in rules])
    assert (d.modality, d.source, d.overridden) == expected


# ----------------------------------------------------------------------------- reading sidecars


@pytest.mark.parametrize(
    ("content", "modality", "problem"),
    [
        (b'{"Modality": "CT", "PatientName": "Doe^Jane", "ImageType": ["ORIGINAL", "PRIMARY"]}', "CT", None),
        (b'{"Modality": " mr "}', "MR", None),
        (b'{"Modality": "CT", "ImageType": "DERIVED\\\\SECONDARY"}', "CT", None),
        (b'{"Modality": "CT",', None, "not valid JSON"),
        (b"\xff\xfe\x00garbage", None, "not valid JSON"),
        (b"[" * 100_000 + b"]" * 100_000, None, "not valid JSON"),  # nesting bomb: RecursionError
        (b'["CT"]', None, "not a JSON object"),
        (b'{"Modality": 7}', None, "Modality is not a DICOM modality code"),
        (b'{"Modality": "C-T"}', None, "Modality is not a DICOM modality code"),
        (b'{"Modality": "CT", "ImageType": {"a": 1}}', "CT", "ImageType is not a list of strings"),
        (b'{"Modality": "CT", "BurnedInAnnotation": false}', "CT", "BurnedInAnnotation is not a string"),
        (b'{"Modality": "CT"}' + b" " * SIDECAR_MAX_BYTES, None, "larger than 1 MiB"),
    ],
    ids=["dcm2niix", "lower_case", "dicom_string_image_type", "truncated", "not_utf8", "nesting_bomb", "a_list",
         "modality_number", "modality_not_a_code", "image_type_object", "burned_in_bool", "too_large"],
)
def test_sidecars_are_read_robustly(tmp_path: Path, content: bytes, modality: str | None, problem: str | None) -> None:
    path = tmp_path / "x.json"
    path.write_bytes(content)
    got = read_sidecar(str(path))
    assert got.modality == modality
    assert (got.problem is None) if problem is None else (problem in (got.problem or ""))


def test_a_fifo_sidecar_is_never_opened_for_reading(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "x.json")  # reading it would block the scan forever
    assert read_sidecar(str(tmp_path / "x.json")).problem == "not a regular file"


def test_a_sidecar_belongs_to_one_nifti(tmp_path: Path) -> None:
    a = write_nifti(tmp_path / "x.nii", HU)
    b = write_nifti(tmp_path / "x.nii.gz", HU)
    side = write_sidecar(a, {"Modality": "CT"})
    assert nifti_of_sidecar(str(side)) == str(a)
    assert sidecar_of_nifti(str(a)) == str(side) and sidecar_of_nifti(str(b)) is None
    assert nifti_of_sidecar(str(tmp_path / "y.json")) is None


# ----------------------------------------------------------------------------- prep end to end


def _accounted(run, archive: Path) -> None:
    files = [p for p in archive.rglob("*") if p.is_file() or p.is_fifo()]
    r = run.report
    assert r["files_seen"] == len(files) == r["files_in_built_series"] + r["files_rejected"]
    for p in files:
        if run.reason(p) is None:
            run.row(p)


def test_sidecars_are_accounted_with_their_nifti(tmp_path: Path, prep, caplog) -> None:
    a = tmp_path / "archive"
    ct = write_nifti(a / "ct.nii.gz", HU)
    ct_json = write_sidecar(ct, {"Modality": "CT", "InstitutionName": "Hospital", "ImageType": ["ORIGINAL"]})
    orphan = write_sidecar(a / "orphan.nii", {"Modality": "CT"})  # no NIfTI beside it
    junk = a / "junk.nii"
    junk.write_bytes(b"not a nifti" * 40)
    junk_json = write_sidecar(junk, {"Modality": "CT"})
    nan = write_nifti(a / "nan.nii", np.full((3, 3, 2), np.nan, np.float32))
    nan_json = write_sidecar(nan, {"Modality": "MR"})
    bad = write_nifti(a / "bad.nii", HU)
    write_sidecar(bad, b"{not json")
    scout = write_nifti(a / "scout.nii", HU)
    scout_json = write_sidecar(scout, {"Modality": "CT", "ImageType": ["ORIGINAL", "PRIMARY", "LOCALIZER"]})
    caplog.set_level(logging.WARNING, logger="data_prep")

    run = prep(a)

    row = run.row(ct)
    assert (row.modality, row.intensity, row.modality_source, row.dtype) == ("CT", "HU", "sidecar", "int16")
    assert run.row(ct_json) == row  # the sidecar is a file of its NIfTI's series
    assert run.reason(orphan) == Reason.NOT_RECOGNISED
    assert (run.reason(junk), run.reason(junk_json)) == (Reason.NIFTI_UNREADABLE, Reason.SIDECAR_OF_REJECTED_NIFTI)
    assert (run.reason(nan), run.reason(nan_json)) == (Reason.NON_FINITE_VALUES, Reason.NON_FINITE_VALUES)
    assert (run.reason(scout), run.reason(scout_json)) == (Reason.LOCALIZER, Reason.SIDECAR_OF_REJECTED_NIFTI)
    assert (run.row(bad).modality, run.row(bad).modality_source) == ("OT", "default")
    assert run.report["files_in_built_series"] == 4  # ct + its sidecar, bad + its (ignored) sidecar
    _accounted(run, a)
    fid = next(f for f, p in run.path_map["files"].items() if p == str(bad))
    assert f"file {fid}: its JSON sidecar is ignored in part or whole: not valid JSON" in caplog.text
    assert str(a) not in caplog.text


def test_the_option_beats_the_sidecar_with_a_warning_by_pseudonym(tmp_path: Path, prep, caplog) -> None:
    a = tmp_path / "archive"
    x = write_nifti(a / "scans" / "x_ct.nii.gz", HU)
    write_sidecar(x, {"Modality": "MR"})
    y = write_nifti(a / "y.nii", HU)
    z = write_nifti(a / "pet" / "z.nii", HU)
    caplog.set_level(logging.WARNING, logger="data_prep")
    run = prep(a, nifti_modality=[f"{a}/pet/*=PT", "*_ct.nii.gz=CT"])
    got = {p.name: (run.row(p).modality, run.row(p).intensity, run.row(p).modality_source) for p in (x, y, z)}
    assert got == {"x_ct.nii.gz": ("CT", "HU", "option"), "y.nii": ("OT", "raw", "default"),
                   "z.nii": ("PT", "raw", "option")}
    fid = next(f for f, p in run.path_map["files"].items() if p == str(x))
    assert f"file {fid}: --nifti-modality says CT, its JSON sidecar says MR: CT is used" in caplog.text
    assert "x_ct" not in caplog.text and str(a) not in caplog.text


def test_derived_secondary_nifti_follows_the_secondary_capture_rule(tmp_path: Path, prep) -> None:
    a = tmp_path / "archive"
    mpr = write_nifti(a / "mpr.nii", HU)
    mpr_json = write_sidecar(mpr, {"Modality": "CT", "ImageType": ["DERIVED", "SECONDARY", "MPR"]})
    vouched = write_nifti(a / "vouched.nii", HU)
    write_sidecar(vouched, {"Modality": "CT", "ImageType": ["DERIVED", "SECONDARY"], "BurnedInAnnotation": "NO"})
    run = prep(a)
    assert (run.reason(mpr), run.reason(mpr_json)) == (Reason.SECONDARY_CAPTURE, Reason.SIDECAR_OF_REJECTED_NIFTI)
    assert run.row(vouched).intensity == "HU"
    kept = prep(a, allow_secondary=True)
    assert (kept.row(mpr).modality, kept.row(mpr).intensity) == ("CT", "HU")  # a NIfTI has no SC SOP class


def test_a_rerun_rebuilds_what_the_rules_changed_and_fills_in_old_sources(tmp_path: Path) -> None:
    a = tmp_path / "archive"
    write_nifti(a / "x.nii", HU)
    out, salt = tmp_path / "cache", tmp_path / "salt"
    first = prep_archive([a], out, salt_file=salt, progress=False)
    assert first.series_built == 1
    sid = json.loads((out / "manifest.json").read_text())["series"][0]["series_id"]
    assert read_series_sidecar(out, sid).modality == "OT"

    second = prep_archive([a], out, salt_file=salt, progress=False, nifti_modality="CT")
    assert (second.series_built, second.series_skipped) == (1, 0)  # OT -> CT: rebuilt, not skipped
    rec = read_series_sidecar(out, sid)
    assert (rec.modality, rec.intensity, rec.modality_source, rec.dtype) == ("CT", "HU", "option", "int16")

    side = out / "series" / f"{sid}.json"  # as an older prep wrote it: no modality_source
    side.write_text(json.dumps({k: v for k, v in json.loads(side.read_text()).items() if k != "modality_source"}))
    assert read_series_sidecar(out, sid).modality_source == "unknown"
    third = prep_archive([a], out, salt_file=salt, progress=False, nifti_modality="CT")
    assert (third.series_built, third.series_skipped) == (0, 1)
    assert read_series_sidecar(out, sid).modality_source == "option"


@pytest.mark.parametrize(
    ("key", "first", "second"),
    [("nifti_modality", {"nifti_modality": ["CT"]}, {}), ("allow_secondary", {"allow_secondary": True}, {})],
)
def test_shards_must_share_the_rules(tmp_path: Path, key: str, first: dict, second: dict) -> None:
    a = tmp_path / "archive"
    write_nifti(a / "x.nii", HU)
    out, salt = tmp_path / "cache", tmp_path / "salt"
    prep_archive([a], out, salt_file=salt, shard=(0, 2), progress=False, **first)
    prep_archive([a], out, salt_file=salt, shard=(1, 2), progress=False, **second)
    with pytest.raises(PrepError, match=f"shards disagree on '{key}'"):
        merge_shards(out)


def test_shard_settings_hold_no_rule_text(tmp_path: Path) -> None:
    a = tmp_path / "archive"
    write_nifti(a / "x.nii", HU)
    out = tmp_path / "cache"
    prep_archive([a], out, shard=(0, 1), progress=False, nifti_modality=[f"{a}/*=CT"])
    (partial,) = (out / "prep_state").glob("shard-*.json")
    settings = json.loads(partial.read_text())["settings"]
    assert settings["allow_secondary"] is False and str(a) not in partial.read_text()
    assert merge_shards(out).series_in_manifest == 1


def test_cli_names_the_option_of_a_bad_rule(tmp_path: Path, capsys) -> None:
    (tmp_path / "archive").mkdir()
    assert main([str(tmp_path / "archive"), "--out", str(tmp_path / "c"), "--nifti-modality", "*.nii=ct"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--nifti-modality" in err[0] and "'ct' is not a DICOM modality code" in err[0]
    assert not (tmp_path / "c").exists()


def test_cli_passes_rules_and_allow_secondary(tmp_path: Path) -> None:
    a = tmp_path / "archive"
    x = write_nifti(a / "x.nii", HU)
    write_sidecar(x, {"ImageType": ["DERIVED", "SECONDARY"]})
    out = tmp_path / "c"
    assert main([str(a), "--out", str(out), "--quiet", "--workers", "1", "--nifti-modality", "x.nii=CT",
                 "--nifti-modality", "MR", "--allow-secondary"]) == 0
    (row,) = json.loads((out / "manifest.json").read_text())["series"]
    assert (row["modality"], row["modality_source"], row["intensity"]) == ("CT", "option", "HU")
