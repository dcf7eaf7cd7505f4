"""The transfer protocol (issue 17, item 1): test data is scored only with ``--final-test``, and each such
run appends one line to the committed test-look log. The benchmark's expensive stages (slabs from
nilearn, pretraining, fine-tuning) are replaced by recorders here: what is checked is the protocol's
wiring; the real stages run in the slow reduced-mode test."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import protocol  # noqa: E402
import transfer  # noqa: E402

sys.path.pop(0)


PRETRAINED_ON: list[list[Path]] = []  # the archives each stand-in pretraining was given


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[dict]:
    """Stand-ins for the benchmark's stages that record what fine-tuning (and pretraining) was given."""
    calls: list[dict] = []
    PRETRAINED_ON.clear()
    slabs = {role: [(tmp_path / f"{role}_{i}.nii.gz", tmp_path / f"{role}_{i}_label.nii.gz") for i in range(2)]
             for role in ("train", "val", "test")}  # fmt: skip

    def pretrain(work, recipe, seed=0, archive=None):  # type: ignore[no-untyped-def]
        PRETRAINED_ON.append(list(archive))
        return tmp_path / "encoder"

    def finetune(work, export, init, seed, recipe, cases_csv, test):  # type: ignore[no-untyped-def]
        calls.append({"init": init, "seed": seed, "test": test})
        base = {"medmae": 0.8, "random": 0.7, "random-sincos": 0.72}[init] + 0.01 * seed
        return {"val": base, **({"test": base - 0.05} if test is not None else {})}

    monkeypatch.setattr(transfer, "write_slabs", lambda work, recipe: slabs)
    monkeypatch.setattr(transfer, "pretrain", pretrain)
    monkeypatch.setattr(transfer, "finetune", finetune)
    return calls


def test_without_final_test_no_test_data_is_scored_and_nothing_is_logged(
    recorded: list[dict], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = tmp_path / "looks.jsonl"
    out = tmp_path / "r.json"
    args = ["--seeds", "0", "1", "--work", str(tmp_path), "--test-log", str(log), "--json", str(out)]
    assert transfer.main(args) == 0
    assert len(recorded) == 6 and all(c["test"] is None for c in recorded)  # 3 starts x 2 seeds
    assert {c["init"] for c in recorded} == {"medmae", "random", "random-sincos"}
    report = json.loads(out.read_text())
    assert "test" not in report and not log.exists()
    assert report["val"]["ratio_vs_random"] > 1 and "ratio_vs_random-sincos" in report["val"]
    assert "not scored" in capsys.readouterr().out


def test_final_test_scores_test_once_and_appends_one_log_line(recorded: list[dict], tmp_path: Path) -> None:
    log = tmp_path / "looks.jsonl"
    log.write_text('{"earlier": "look"}\n')
    args = ["--seeds", "0", "1", "--work", str(tmp_path), "--test-log", str(log), "--final-test"]
    assert transfer.main(args) == 0
    assert all(c["test"] is not None for c in recorded)
    lines = log.read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[0]) == {"earlier": "look"}  # appended, never rewritten
    look = json.loads(lines[1])
    assert look["benchmark"] == transfer.benchmark_name("tissue") and look["commit"] and look["date"]
    assert [r["test"] for r in look["per_seed"]["medmae"]] == pytest.approx([0.75, 0.76])
    assert look["summary"]["every_seed_above_random"] and look["recipe"]["finetune_steps"] > 0


def test_compare_reports_both_baselines_and_the_margin() -> None:
    got = protocol.compare({"medmae": [0.8, 0.9], "random": [0.7, 0.85], "random-sincos": [0.6, 0.7]})
    assert got["ratio_vs_random"] == pytest.approx(0.85 / 0.775)
    assert got["margin_vs_random"] == pytest.approx(-0.05) and not got["every_seed_above_random"]
    assert got["margin_vs_random-sincos"] == pytest.approx(0.1) and got["every_seed_above_random-sincos"]


def test_the_committed_log_is_strict_json_lines() -> None:
    for line in protocol.TEST_LOG.read_text().splitlines():
        look = json.loads(line)
        assert {"date", "commit", "benchmark", "recipe", "summary"} <= set(look)


def test_extra_unlabelled_scans_join_pretraining_and_the_record_names_them(
    recorded: list[dict], tmp_path: Path
) -> None:
    extra = tmp_path / "extra"
    extra.mkdir()
    for name in ("head.nii.gz", "brain.nii.gz"):
        (extra / name).write_bytes(b"")  # stand-in pretraining never reads them
    out = tmp_path / "r.json"
    args = ["--seeds", "0", "--work", str(tmp_path), "--json", str(out), "--extra-unlabelled", str(extra)]
    assert transfer.main(args) == 0
    assert PRETRAINED_ON == [[tmp_path / "unlabelled", extra]]  # beside the template's planes, not instead
    record = json.loads(out.read_text())["recipe"]
    assert record["extra_unlabelled"] == ["brain.nii.gz", "head.nii.gz"]  # file names, not the machine's path
    assert all(c["test"] is None for c in recorded)


def test_a_wrong_extra_unlabelled_folder_stops_before_anything_runs(recorded: list[dict], tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="not a folder of NIfTI files"):
        transfer.main(["--seeds", "0", "--work", str(tmp_path), "--extra-unlabelled", str(tmp_path / "missing")])
    assert recorded == [] and PRETRAINED_ON == []
