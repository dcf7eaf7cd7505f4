"""``model.mae`` / ``model.optim``: validated frozen options, read from YAML, and the old flat keys."""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from medmae.models import MAEOptions, MaskedAutoencoder3D, build_mae, create_mae, create_mae3d
from medmae.train.cli import fit_main
from medmae.train.module import MAEPretrainModule
from medmae.train.options import LEGACY_KEYS, OptimOptions, migrate_legacy_hparams

TINY_MAE = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2,
            "decoder_embed_dim": 32, "decoder_depth": 1, "decoder_num_heads": 2}  # fmt: skip
TINY_3D = {"img_size": 16, "patch_size": 8, "embed_dim": 24, "depth": 2, "num_heads": 2,
           "decoder_embed_dim": 24, "decoder_depth": 1, "decoder_num_heads": 2}  # fmt: skip


@pytest.mark.parametrize(
    ("cls", "field", "value", "message"),
    [
        (MAEOptions, "depth", 0, "model.mae.depth must be an int in [1, 256], got 0"),
        (MAEOptions, "embed_dim", 10**7, "model.mae.embed_dim must be an int in [1, 8192], got 10000000"),
        (MAEOptions, "in_chans", True, "model.mae.in_chans must be an int in [1, 8192], got True"),
        (MAEOptions, "mask_ratio", 1.0, "model.mae.mask_ratio must be a number in [0, 1), got 1.0"),
        (MAEOptions, "drop_path_rate", -0.1, "model.mae.drop_path_rate must be a number in [0, 1), got -0.1"),
        (MAEOptions, "mlp_ratio", 0, "model.mae.mlp_ratio must be a number in (0, 64], got 0"),
        (MAEOptions, "decoder_mlp_ratio", "4", "model.mae.decoder_mlp_ratio must be a number in (0, 64], got '4'"),
        (MAEOptions, "norm_pix_loss", 1, "model.mae.norm_pix_loss must be true or false, got 1"),
        (MAEOptions, "img_size", (32, 0), "model.mae.img_size must be"),
        (MAEOptions, "img_size", (8, 8, 8, 8), "model.mae.img_size must be"),
        (OptimOptions, "blr", 0.0, "model.optim.blr must be a number > 0, got 0.0"),
        (OptimOptions, "lr", -1.0, "model.optim.lr must be null or a number > 0, got -1.0"),
        (OptimOptions, "min_lr", -1e-6, "model.optim.min_lr must be a number >= 0"),
        (OptimOptions, "weight_decay", -0.05, "model.optim.weight_decay must be a number >= 0"),
        (OptimOptions, "betas", (0.9, 1.5), "model.optim.betas must be two numbers in [0, 1), got (0.9, 1.5)"),
        (OptimOptions, "betas", (0.9,), "model.optim.betas must be two numbers in [0, 1)"),
        (OptimOptions, "warmup_epochs", -1, "model.optim.warmup_epochs must be a number >= 0, got -1"),
        (OptimOptions, "warmup_steps", -1, "model.optim.warmup_steps must be null or an int >= 0, got -1"),
        (OptimOptions, "warmup_steps", 2.5, "model.optim.warmup_steps must be null or an int >= 0, got 2.5"),
    ],
)
def test_a_bad_value_is_one_line_naming_the_field(cls: type, field: str, value: Any, message: str) -> None:
    with pytest.raises(ValueError) as err:
        cls(**{field: value})
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_the_options_are_frozen_and_normalised() -> None:
    mae = MAEOptions(img_size=[64, 48])  # type: ignore[arg-type]  # YAML gives lists
    assert mae.img_size == (64, 48) and mae.to_dict()["img_size"] == [64, 48]
    assert OptimOptions(betas=[0.9, 0.99]).betas == (0.9, 0.99)  # type: ignore[arg-type]
    with pytest.raises(dataclasses.FrozenInstanceError):
        mae.depth = 3  # type: ignore[misc]
    with pytest.raises(ValueError, match="model.mae.dept is not an option"):
        MAEOptions.of({"dept": 3})
    with pytest.raises(ValueError, match="model.optim.blr must be"):
        OptimOptions.of(None, blr=-1)


def test_the_builders_take_the_one_options_type() -> None:
    """``create_mae`` keywords are ``MAEOptions`` fields: the same model, the same weights."""
    torch.manual_seed(0)
    by_keywords = create_mae("mae_vit_tiny_patch16", **TINY_MAE)
    torch.manual_seed(0)
    by_options = build_mae("mae_vit_tiny_patch16", MAEOptions(**TINY_MAE))
    pairs = zip(by_keywords.state_dict().values(), by_options.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)
    with pytest.raises(ValueError, match="model.mae.depth must be an int"):
        create_mae("mae_vit_tiny_patch16", depth=0)
    with pytest.raises(ValueError, match=r"model.mae.img_size must be S or \[Z, Y, X\]"):
        build_mae("mae3d_vit_tiny_patch16", MAEOptions(img_size=(32, 32)))
    three = create_mae3d("mae3d_vit_tiny_patch16", **TINY_3D)
    assert isinstance(three, MaskedAutoencoder3D) and three.decoder_embed.out_features == 24
    assert create_mae3d("mae3d_vit_tiny_patch16", img_size=32, depth=1).decoder_embed.out_features == 384


def test_legacy_table_covers_every_field_once() -> None:
    fields = [f"mae.{f.name}" for f in dataclasses.fields(MAEOptions)]
    fields += [f"optim.{f.name}" for f in dataclasses.fields(OptimOptions)]
    assert sorted(LEGACY_KEYS.values()) == sorted(fields)
    assert all(new.split(".")[1] == old for old, new in LEGACY_KEYS.items())
    assert MAEPretrainModule.LEGACY_KEYS is LEGACY_KEYS


def test_migration_moves_old_keys_and_refuses_both_ways() -> None:
    said: list[str] = []
    out = migrate_legacy_hparams({"variant": "v", "blr": 1e-3, "mask_ratio": 0.9, "mae": {"depth": 2}}, said.append)
    assert out == {"variant": "v", "mae": {"depth": 2, "mask_ratio": 0.9}, "optim": {"blr": 1e-3}}
    assert said == ["model.blr is deprecated: use model.optim.blr",
                    "model.mask_ratio is deprecated: use model.mae.mask_ratio"]  # fmt: skip
    with pytest.raises(ValueError, match="model.depth and model.mae.depth are both given"):
        migrate_legacy_hparams({"depth": 3, "mae": {"depth": 2}})
    moved = migrate_legacy_hparams({"depth": 3, "mae": MAEOptions(img_size=64)})
    assert moved["mae"] == MAEOptions(img_size=64, depth=3)  # an options object is overridden field by field


@pytest.mark.parametrize(("variant", "mae"), [("mae_vit_tiny_patch16", TINY_MAE), ("mae3d_vit_tiny_patch16", TINY_3D)])
def test_old_keyword_arguments_warn_and_build_the_same_module(variant: str, mae: dict) -> None:
    optim = {"blr": 1e-3, "warmup_steps": 0, "betas": (0.9, 0.99)}
    torch.manual_seed(0)
    with pytest.warns(DeprecationWarning, match=r"model.blr is deprecated: use model.optim.blr"):
        old = MAEPretrainModule(variant=variant, **mae, **optim)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        new = MAEPretrainModule(variant=variant, mae=MAEOptions(**mae), optim=OptimOptions(**optim))
    assert dict(old.hparams) == dict(new.hparams)
    assert new.hparams["mae"]["img_size"] == mae["img_size"] and new.hparams["optim"]["betas"] == [0.9, 0.99]
    assert old.state_dict().keys() == new.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(old.state_dict().values(), new.state_dict().values(), strict=True))
    assert new.spatial_dims == (3 if variant.startswith("mae3d") else 2)
    again = MAEPretrainModule(**dict(new.hparams))  # the saved form (plain mappings) builds it back
    assert dict(again.hparams) == dict(new.hparams)
    with pytest.raises(TypeError, match="unexpected keyword argument 'decoder_width'"):
        MAEPretrainModule(variant=variant, decoder_width=3)


def _print_config(tmp_path: Path, capsys: pytest.CaptureFixture, config: str, *extra: str) -> tuple[dict, str]:
    (tmp_path / "c.yaml").write_text(config)
    with pytest.raises(SystemExit) as done:
        fit_main(["--config", str(tmp_path / "c.yaml"), *extra, "--print_config"])
    assert done.value.code in (0, None)
    out = capsys.readouterr()
    return yaml.safe_load(out.out)["model"], out.err


DATA = "data:\n  cache_dir: nowhere\n  img_size: [64, 64]\n"


def test_the_cli_reads_the_new_layout(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = ("model:\n  variant: mae_vit_tiny_patch16\n  mae: {img_size: [64, 64], depth: 3}\n"
              "  optim: {blr: 1.0e-3, betas: [0.9, 0.99]}\n" + DATA)  # fmt: skip
    model, err = _print_config(tmp_path, capsys, config, "--model.mae.patch_size", "8")
    assert model["mae"]["depth"] == 3 and model["mae"]["patch_size"] == 8 and model["mae"]["img_size"] == [64, 64]
    assert model["optim"]["blr"] == 1e-3 and model["optim"]["betas"] == [0.9, 0.99]
    assert "deprecated" not in err


def test_old_flat_keys_load_with_a_deprecation_naming_the_new_key(tmp_path: Path, capsys) -> None:
    config = "model:\n  variant: mae_vit_tiny_patch16\n  img_size: [64, 64]\n  blr: 1.0e-3\n" + DATA
    model, err = _print_config(tmp_path, capsys, config, "--model.mask_ratio", "0.9")
    assert model["mae"]["img_size"] == [64, 64] and model["mae"]["mask_ratio"] == 0.9
    assert model["optim"]["blr"] == 1e-3 and "blr" not in model
    lines = [line for line in err.splitlines() if "deprecated" in line]
    assert "medmae fit: warning: model.blr is deprecated: use model.optim.blr" in lines
    assert "medmae fit: warning: model.mask_ratio is deprecated: use model.mae.mask_ratio" in lines
    assert "medmae fit: warning: model.img_size is deprecated: use model.mae.img_size" in lines
