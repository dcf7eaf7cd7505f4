"""Every shipped pretraining config parses through LightningCLI and builds a model that fits its data settings."""

import sys
from pathlib import Path

import pytest
import yaml

from medmae.data import CacheDataModule
from medmae.demo import DEMO_DATA, DEMO_MODEL
from medmae.models import as_hw
from medmae.train import MAEPretrainModule
from medmae.train.cli import MedMAECLI

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
CONFIGS = sorted((CONFIG_DIR / "pretrain").rglob("*.yaml"))  # finetune configs: tests/finetune


@pytest.mark.parametrize("config", CONFIGS, ids=[c.name for c in CONFIGS])
def test_config_instantiates_and_model_fits_data(config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # GPU configs are checked on CPU: only the hardware fields are overridden
    monkeypatch.setattr(sys, "argv", [
        "medmae", "--config", str(config), "--trainer.accelerator", "cpu", "--trainer.devices", "1",
        "--trainer.strategy", "auto", "--trainer.precision", "32-true", "--trainer.logger", "false",
    ])
    cli = MedMAECLI(MAEPretrainModule, CacheDataModule, run=False, seed_everything_default=0)
    cli.model.check_data_compatible(cli.datamodule)
    assert cli.datamodule.channels == cli.model.model.in_chans


def test_tiny_cpu_config_is_the_demo() -> None:
    config = yaml.safe_load((CONFIG_DIR / "pretrain" / "tiny_cpu.yaml").read_text())
    assert config["model"]["variant"] == DEMO_MODEL["variant"]
    for section in ("mae", "optim"):  # model.mae / model.optim (medmae.train.options)
        for key, value in DEMO_MODEL[section].items():
            got = config["model"][section][key]
            assert (as_hw(got) == as_hw(value)) if key == "img_size" else got == value, f"{section}.{key}"
    for key, value in DEMO_DATA.items():
        got = config["data"][key]
        assert (as_hw(got) == as_hw(value)) if key == "img_size" else got == value, key
