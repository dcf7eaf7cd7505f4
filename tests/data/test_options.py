"""The ``data.*`` option sections (issue 19): each checks itself naming the full key; old flat keys still load."""

from __future__ import annotations

import dataclasses
import re
import sys
import warnings
from pathlib import Path

import pytest

from medmae.data import (
    LEGACY_KEYS,
    CacheDataModule,
    CropOptions,
    ForegroundOptions,
    IntensityOptions,
    LoaderOptions,
    SamplingOptions,
    SelectionOptions,
)
from medmae.data.options import SECTIONS, migrate_legacy

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "pretrain" / "tiny_cpu.yaml"

#: every option that was a flat ``CacheDataModule`` argument before issue 19 and now lives in a section
OLD_FLAT = {
    "modalities", "min_size", "min_slices", "include_images", "max_anisotropy",
    "sampling_alpha", "samples_per_epoch", "val_samples",
    "crop_scale", "crop_ratio", "hflip_prob", "interpolation", "antialias",
    "ct_windows", "ct_window_mode", "ct_inference_window", "percentiles",
    "foreground_fraction", "foreground_hu", "foreground_level", "foreground_tries",
    "pin_memory", "device_transforms", "persistent_workers", "prefetch_factor", "max_open_files", "verify_on_setup",
}  # fmt: skip

BAD = [
    ("selection", "modalities", "CT"),
    ("selection", "modalities", []),
    ("selection", "min_size", 0),
    ("selection", "min_slices", 0),
    ("selection", "max_anisotropy", 0.5),
    ("sampling", "sampling_alpha", 1.5),
    ("sampling", "sampling_alpha", None),
    ("sampling", "samples_per_epoch", 0),
    ("sampling", "val_samples", 0),
    ("crop", "crop_scale", (0.5, 0.2)),
    ("crop", "crop_scale", (0.2, 1.5)),
    ("crop", "crop_scale", "big"),
    ("crop", "crop_ratio", (0.0, 1.0)),
    ("crop", "hflip_prob", 2.0),
    ("crop", "interpolation", "lanczos"),
    ("intensity", "ct_windows", [(40, -400)]),
    ("intensity", "ct_windows", []),
    ("intensity", "ct_window_mode", "mixed"),
    ("intensity", "ct_inference_window", 3),
    ("intensity", "ct_inference_window", True),
    ("intensity", "percentiles", (2.0, 98.0)),
    ("foreground", "foreground_fraction", 1.0),
    ("foreground", "foreground_hu", float("nan")),
    ("foreground", "foreground_level", 1.0),
    ("foreground", "foreground_tries", -1),
    ("loader", "device_transforms", "yes"),
    ("loader", "prefetch_factor", 0),
    ("loader", "max_open_files", 0),
]


@pytest.mark.parametrize(("section", "field", "value"), BAD, ids=[f"{s}.{f}={v!r}" for s, f, v in BAD])
def test_each_section_names_the_full_key_in_one_line(section: str, field: str, value: object) -> None:
    key = re.escape(f"data.{section}.{field}")
    with pytest.raises(ValueError, match=f"^{key}") as direct:
        SECTIONS[section](**{field: value})
    assert "\n" not in str(direct.value)
    with pytest.raises(ValueError, match=f"^{key}"):  # a mapping from Python: the same check
        CacheDataModule("cache", **{section: {field: value}})


def test_sections_are_frozen_and_normalised() -> None:
    chosen = SelectionOptions(modalities=["mr", "CT", "ct"], max_anisotropy=2)
    assert chosen.modalities == ("CT", "MR") and chosen.max_anisotropy == 2.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        chosen.min_size = 1  # type: ignore[misc]
    assert CropOptions(crop_scale=[0.3, 1]).crop_scale == (0.3, 1.0)
    assert IntensityOptions(ct_windows=[[40, 400]]).ct_windows == ((40.0, 400.0),)
    assert ForegroundOptions(foreground_hu=-400).foreground_hu == -400.0
    assert SamplingOptions(sampling_alpha=1).sampling_alpha == 1.0
    assert LoaderOptions() == LoaderOptions(pin_memory=True, device_transforms=None)


def test_a_section_mapping_with_an_unknown_key_is_refused() -> None:
    with pytest.raises(ValueError, match=r"data\.crop has no option 'crop_scal'"):
        CacheDataModule("cache", crop={"crop_scal": (0.3, 1.0)})
    with pytest.raises(ValueError, match=r"data\.loader must be a LoaderOptions section"):
        CacheDataModule("cache", loader=[1, 2])


def test_the_legacy_table_covers_every_old_flat_option_and_points_at_real_fields() -> None:
    assert set(LEGACY_KEYS) == OLD_FLAT
    for old, new in LEGACY_KEYS.items():
        section, field = new.split(".")
        assert field == old and field in {f.name for f in dataclasses.fields(SECTIONS[section])}


def test_migrate_legacy_moves_each_old_key_with_one_message() -> None:
    said: list[str] = []
    out = migrate_legacy(
        {"cache_dir": "c", "crop_scale": [0.3, 1], "min_size": 8, "crop": {"hflip_prob": 0.0}}, warn=said.append
    )
    assert out == {"cache_dir": "c", "crop": {"hflip_prob": 0.0, "crop_scale": [0.3, 1]}, "selection": {"min_size": 8}}
    assert said == [
        "data.crop_scale is deprecated: use data.crop.crop_scale",
        "data.min_size is deprecated: use data.selection.min_size",
    ]
    nested = migrate_legacy({"class_path": "medmae.data.CacheDataModule", "init_args": {"pin_memory": False}},
                            warn=said.append)  # fmt: skip
    assert nested["init_args"] == {"loader": {"pin_memory": False}}
    with pytest.raises(ValueError, match=r"data\.crop_scale and data\.crop\.crop_scale are both given"):
        migrate_legacy({"crop_scale": [0.3, 1], "crop": {"crop_scale": [0.5, 1]}}, warn=said.append)


def test_old_python_kwargs_still_work_with_a_deprecation_warning() -> None:
    with pytest.warns(DeprecationWarning, match=r"data\.crop_scale is deprecated: use data\.crop\.crop_scale"):
        old = CacheDataModule("cache", img_size=32, crop_scale=(0.3, 1.0), min_size=8, ct_window_mode="channels")
    new = CacheDataModule(
        "cache",
        img_size=32,
        crop=CropOptions(crop_scale=(0.3, 1.0)),
        selection=SelectionOptions(min_size=8),
        intensity=IntensityOptions(ct_window_mode="channels"),
    )
    assert old.preprocessing() == new.preprocessing()
    assert old.crop == new.crop and old.selection == new.selection and old.intensity == new.intensity
    with warnings.catch_warnings():  # an old key overrides that field of a section object given beside it
        warnings.simplefilter("ignore", DeprecationWarning)
        both = CacheDataModule("cache", crop=CropOptions(hflip_prob=0.0), crop_scale=(0.3, 1.0))
    assert both.crop == CropOptions(crop_scale=(0.3, 1.0), hflip_prob=0.0)
    with pytest.raises(TypeError, match="unexpected keyword argument 'crop_scal'"):
        CacheDataModule("cache", crop_scal=(0.3, 1.0))


def test_the_datamodule_checkpoint_state_is_unchanged(tmp_path: Path) -> None:
    """What pre-issue-19 checkpoints hold for the datamodule still resumes a datamodule of the new form."""
    dm = CacheDataModule(str(tmp_path / "cache"), sampling=SamplingOptions(samples_per_epoch=64))
    assert set(dm.state_dict()) == {"train_position", "manifest_version"}
    dm.load_state_dict({"train_position": {"epoch": 2, "draws_done": 12}, "manifest_version": "0123456789abcdef"})
    assert dm.train_position == {"epoch": 2, "draws_done": 12} and dm._pinned_manifest == "0123456789abcdef"


# ---------------------------------------------------------------------------------------------- the CLI


def _print_config(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    from medmae.train.cli import run_cli

    with pytest.raises(SystemExit) as exc:
        run_cli("fit", argv)
    out, err = capsys.readouterr()
    return int(exc.value.code or 0), out, err


def test_an_old_flat_yaml_loads_through_medmae_fit_with_one_line_per_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import yaml

    old = tmp_path / "old.yaml"
    old.write_text(
        "data:\n  cache_dir: cache\n  crop_scale: [0.3, 1]\n  min_size: 16\n  ct_windows: [[40, 400]]\n"
        "  samples_per_epoch: 64\n  pin_memory: false\n  foreground_level: 5e-2\n"
    )
    code, out, err = _print_config(["--config", str(old), "--data.hflip_prob", "0.1", "--print_config"], capsys)
    assert code == 0, err
    assert err.splitlines() == [
        "medmae fit: warning: data.hflip_prob is deprecated: use data.crop.hflip_prob",
        "medmae fit: warning: data.crop_scale is deprecated: use data.crop.crop_scale",
        "medmae fit: warning: data.min_size is deprecated: use data.selection.min_size",
        "medmae fit: warning: data.ct_windows is deprecated: use data.intensity.ct_windows",
        "medmae fit: warning: data.samples_per_epoch is deprecated: use data.sampling.samples_per_epoch",
        "medmae fit: warning: data.pin_memory is deprecated: use data.loader.pin_memory",
        "medmae fit: warning: data.foreground_level is deprecated: use data.foreground.foreground_level",
    ]
    data = yaml.safe_load(out)["data"]  # --print_config writes the new layout
    assert data["crop"]["crop_scale"] == [0.3, 1.0] and data["crop"]["hflip_prob"] == 0.1
    assert data["selection"]["min_size"] == 16 and data["intensity"]["ct_windows"] == [[40.0, 400.0]]
    assert data["sampling"]["samples_per_epoch"] == 64 and data["loader"]["pin_memory"] is False
    assert data["foreground"]["foreground_level"] == 0.05  # read as jsonargparse reads YAML (5e-2 is a number)
    assert not set(data) & set(LEGACY_KEYS)


def test_old_flat_keys_build_the_same_datamodule_through_the_cli_class(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The LightningCLI class itself (as tests/test_configs.py builds it), old layout vs new layout."""
    from medmae.train import MAEPretrainModule
    from medmae.train.cli import MedMAECLI

    old = tmp_path / "old.yaml"
    old.write_text("data:\n  crop_scale: [0.3, 1]\n  foreground_fraction: 0.2\n  val_samples: 4\n")
    new = tmp_path / "new.yaml"
    new.write_text("data:\n  crop: {crop_scale: [0.3, 1]}\n  foreground: {foreground_fraction: 0.2}\n"
                   "  sampling: {val_samples: 4, samples_per_epoch: 3200}\n  selection: {min_size: 32}\n")  # fmt: skip
    built = []
    for config in (old, new):
        monkeypatch.setattr(sys, "argv", ["medmae", "--config", str(TINY), "--config", str(config),
                                          "--trainer.logger", "false"])  # fmt: skip
        built.append(MedMAECLI(MAEPretrainModule, CacheDataModule, run=False, seed_everything_default=0).datamodule)
    assert built[0].preprocessing() == built[1].preprocessing()
    assert built[0].crop.crop_scale == (0.3, 1.0) and built[0].sampling.val_samples == 4
    assert "data.foreground_fraction is deprecated: use data.foreground.foreground_fraction" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("where", "key"),
    [("yaml", "crop_scal"), ("argv", "crop_scal"), ("yaml-section", "crop.crop_scal")],
)
def test_a_truly_unknown_key_still_fails_with_one_error_line(
    where: str, key: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--config", str(TINY), "--print_config"]
    if where == "argv":
        argv += [f"--data.{key}", "[0.3, 1]"]
    else:
        section, _, leaf = key.rpartition(".")
        body = f"  {section}:\n    {leaf}: [0.3, 1]\n" if section else f"  {leaf}: [0.3, 1]\n"
        (tmp_path / "bad.yaml").write_text("data:\n" + body)
        argv += ["--config", str(tmp_path / "bad.yaml")]
    code, _, err = _print_config(argv, capsys)
    assert code == 2
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and key.rpartition(".")[2] in errors[0], err
    assert "Traceback" not in err and "deprecated" not in err


def test_an_old_key_given_both_ways_in_one_file_is_one_error_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "both.yaml").write_text("data:\n  crop_scale: [0.3, 1]\n  crop:\n    crop_scale: [0.5, 1]\n")
    code, _, err = _print_config(["--config", str(TINY), "--config", str(tmp_path / "both.yaml"), "--print_config"],
                                 capsys)  # fmt: skip
    errors = [line for line in err.splitlines() if "error:" in line]
    assert code == 2 and len(errors) == 1 and "data.crop.crop_scale" in errors[0], err


def test_a_whole_old_section_given_as_a_file_or_string_loads_with_one_line_per_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--data FILE`` / ``--model=YAML``: jsonargparse reads a section's config without the main parser's
    loader, so the old flat keys are moved before it sees the value."""
    import yaml

    (tmp_path / "data.yaml").write_text("cache_dir: c\ncrop_scale: [0.3, 1.0]\nmin_size: 16\n")
    code, out, err = _print_config(
        ["--config", str(TINY), "--data", str(tmp_path / "data.yaml"), "--model={mask_ratio: 0.6, blr: 0.002}",
         "--print_config"], capsys)  # fmt: skip
    printed = yaml.safe_load(out)
    assert code == 0, err
    assert printed["data"]["crop"]["crop_scale"] == [0.3, 1.0] and printed["data"]["selection"]["min_size"] == 16
    assert printed["model"]["mae"]["mask_ratio"] == 0.6 and printed["model"]["optim"]["blr"] == 0.002
    warned = sorted(line.split("warning: ")[1].split(" is")[0] for line in err.splitlines() if "warning:" in line)
    assert warned == ["data.crop_scale", "data.min_size", "model.blr", "model.mask_ratio"], err


def test_an_old_key_given_both_ways_in_one_section_value_is_one_error_line(capsys: pytest.CaptureFixture[str]) -> None:
    both = "--data={cache_dir: c, crop_scale: [0.3, 1], crop: {crop_scale: [0.5, 1]}}"
    code, _, err = _print_config(["--config", str(TINY), both, "--print_config"], capsys)
    errors = [line for line in err.splitlines() if "error:" in line]
    assert code == 2 and len(errors) == 1 and "data.crop.crop_scale" in errors[0], err


def test_a_section_file_in_the_new_layout_is_passed_on_untouched() -> None:
    from medmae.train.cli import LEGACY_TABLES, migrate_argv

    said: list[str] = []
    argv = ["fit", "--data", "does/not/exist.yaml", "--model", "{mae: {depth: 2}}", "--data={crop: {hflip_prob: 0}}"]
    assert migrate_argv(argv, LEGACY_TABLES, said.append) == argv and not said


def test_migrate_config_reaches_sections_under_a_subcommand() -> None:
    """Checkpoint hyper-parameters and main-parser configs nest the sections under the subcommand."""
    from medmae.train.cli import LEGACY_TABLES, migrate_argv, migrate_config

    said: list[str] = []
    out = migrate_config({"fit": {"data": {"min_size": 8}}, "data": {"pin_memory": False}}, LEGACY_TABLES, said.append)
    assert out == {"fit": {"data": {"selection": {"min_size": 8}}}, "data": {"loader": {"pin_memory": False}}}
    argv = migrate_argv(["fit", "--data.crop_scale=[0.3,1]", "--data.init_args.min_size", "8", "--data.cache_dir", "c"],
                        LEGACY_TABLES, said.append)  # fmt: skip
    assert argv == ["fit", "--data.crop.crop_scale=[0.3,1]", "--data.selection.min_size", "8", "--data.cache_dir", "c"]
    assert len(said) == 4


def test_configs_ship_in_the_new_layout() -> None:
    import yaml

    for config in sorted((REPO / "configs" / "pretrain").glob("*.yaml")):
        data = yaml.safe_load(config.read_text())["data"]
        assert not set(data) & set(LEGACY_KEYS), config.name


def test_a_new_layout_config_resumes_a_checkpoint_written_before_issue_19(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The model side's pre-issue-19 fixture (tests/fixtures/): its run's config moved to the new layout
    resumes it with the same data stream and weights as the old flat config does."""
    import json

    import torch
    import yaml

    from medmae.train.cli import LEGACY_TABLES, fit_main, migrate_config
    from tests.fixtures.make_old_mae_checkpoint import build_cache

    fixtures = REPO / "tests" / "fixtures"
    reference = json.loads((fixtures / "old_mae_reference.json").read_text())
    old = yaml.safe_load(reference["config_2d"])
    new = migrate_config(old, LEGACY_TABLES, lambda message: None)
    assert new["data"]["selection"] == {"min_size": 32} and new["data"]["sampling"] == {"samples_per_epoch": 16}
    monkeypatch.chdir(tmp_path)
    build_cache(tmp_path / "cache")
    (tmp_path / "old.yaml").write_text(yaml.safe_dump(new))  # the name resume_args use
    old_ckpt = torch.load(fixtures / "old_mae_2d.ckpt", map_location="cpu", weights_only=True)
    assert fit_main([*reference["resume_args"], "--ckpt_path", str(fixtures / "old_mae_2d.ckpt")]) == 0
    assert "data." not in capsys.readouterr().err  # nothing of the data side is deprecated any more
    resumed = torch.load(max((tmp_path / "runs").rglob("last*.ckpt"), key=lambda p: p.stat().st_mtime_ns),
                         map_location="cpu", weights_only=True)  # fmt: skip
    assert resumed["global_step"] == reference["2d"]["resumed_global_step"]
    state, before = resumed["CacheDataModule"], old_ckpt["CacheDataModule"]
    assert state["manifest_version"] == before["manifest_version"]  # the same cache, pinned as before
    assert state["train_position"]["draws_done"] > before["train_position"]["draws_done"]  # the stream went on
    for name, (total, _) in reference["2d"]["resumed_sums"].items():
        assert float(resumed["state_dict"][name].double().sum()) == pytest.approx(total, rel=1e-5, abs=1e-5), name
