"""Export cards and pretraining checkpoints are untrusted input (issue 18, rows 7 and 8).

A card nested 200,000 levels deep, a ``preprocessing.image_size`` of [65536, 65536], an encoder of
256 blocks x 8192 wide, or an architecture whose sizes disagree with the weights must each stop in
one line, before anything is allocated: the JSON nesting is scanned before parsing, every size is
bounded, and the weight shapes (from the safetensors header) are compared with the card's encoder
(built on the meta device) before any real model exists.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import timm
import torch

from medmae.data import CacheDataModule
from medmae.export import CardError, export_encoder, load_card, load_timm_encoder, preprocessing_from_card
from medmae.export import card as card_module
from medmae.export.cli import main as export_main
from medmae.finetune.encoders import parse_init, resolve_encoder
from medmae.finetune.seg_cli import finetune_main
from medmae.models import create_mae

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-block, patch-8, 32x32 encoder with its pretraining preprocessing record."""
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("export")
    mae = create_mae("mae_vit_tiny_patch16", img_size=32, patch_size=8, depth=2, decoder_depth=1)
    export_encoder(mae, out, preprocessing=CacheDataModule(str(out / "no_cache"), img_size=32).preprocessing())
    return out


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        if f.is_file():
            (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _card(export: Path) -> dict[str, Any]:
    return json.loads((export / "encoder.json").read_text())


def _write(export: Path, card: dict[str, Any]) -> None:
    (export / "encoder.json").write_text(json.dumps(card))


@pytest.fixture
def no_real_timm_build(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test at once if a timm model is built anywhere but on the meta device."""
    create = timm.create_model

    def spy(*args: Any, **kwargs: Any) -> Any:
        assert torch.get_default_device().type == "meta", "a real model was built from a hostile card"
        return create(*args, **kwargs)

    monkeypatch.setattr(timm, "create_model", spy)


def _one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


# ----------------------------------------------------------------------------- row 7: nesting


def test_a_card_nested_200000_levels_is_one_line(export: Path, tmp_path: Path) -> None:
    bad = _copy(export, tmp_path / "deep")
    (bad / "encoder.json").write_text('{"format": 1, "x": ' + "[" * 200_000 + "]" * 200_000 + "}")
    start = time.perf_counter()
    deeper = r"deep/encoder\.json: unreadable card \(JSON nested deeper than 64 levels"
    with pytest.raises(CardError, match=deeper):
        load_card(bad)
    assert time.perf_counter() - start < 10


def test_finetune_seg_given_a_deep_card_stops_in_one_line(
    export: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = _copy(export, tmp_path / "deep")
    (bad / "encoder.json").write_text('{"encoder": ' + "{" * 200_000 + "}" * 200_000 + "}")
    with pytest.raises(SystemExit) as done:
        finetune_main([
            "--config", str(REPO / "configs/finetune/seg_tiny_cpu.yaml"), "--model.init", f"medmae:{bad}",
            "--data.csv", str(tmp_path / "cases.csv"), "--trainer.logger", "false",
        ])  # fmt: skip
    assert done.value.code == 2
    assert "nested deeper than" in _one_error_line(capsys)


def test_nesting_scan_ignores_brackets_in_strings_and_counts_real_depth(export: Path, tmp_path: Path) -> None:
    json_too_deep = card_module.json_too_deep
    assert json_too_deep('{"a": "[[[[[[[[[[{{{{{{{{", "b": "\\"[[["}', limit=2) is None
    assert json_too_deep("[" * 65 + "]" * 65) == 64 and json_too_deep("[" * 64 + "]" * 64) is None
    card = _card(export)
    card["producer"] = "[" * 5000 + "\\\\" + "{" * 5000  # brackets inside a string are not nesting
    ok = _copy(export, tmp_path / "ok")
    _write(ok, card)
    assert load_card(ok)["producer"].startswith("[[[")


def test_an_oversized_number_or_a_huge_card_is_one_line(export: Path, tmp_path: Path) -> None:
    bad = _copy(export, tmp_path / "digits")
    (bad / "encoder.json").write_text('{"format": ' + "9" * 5000 + "}")
    with pytest.raises(CardError, match="unreadable card"):
        load_card(bad)
    (bad / "encoder.json").write_text('{"format": 1, "pad": "' + "x" * (5 * 1024**2) + '"}')
    with pytest.raises(CardError, match="larger than"):
        load_card(bad)


# ----------------------------------------------------------------------------- row 8: sizes


def test_image_size_65536_is_refused_before_any_build(export: Path, tmp_path: Path, no_real_timm_build: None) -> None:
    bad = _copy(export, tmp_path / "big")
    card = _card(bad)
    card["preprocessing"]["image_size"] = [65536, 65536]
    _write(bad, card)
    with pytest.raises(CardError, match=r"big/encoder\.json: field 'preprocessing\.image_size'.*1 to 4096"):
        preprocessing_from_card(load_card(bad), where=str(bad / "encoder.json"))
    with pytest.raises(CardError, match=r"field 'preprocessing\.image_size'"):
        resolve_encoder(parse_init(f"medmae:{bad}"))


def test_image_size_within_the_sides_but_too_many_patches_is_refused(export: Path, tmp_path: Path) -> None:
    bad = _copy(export, tmp_path / "tokens")
    card = _card(bad)
    card["preprocessing"]["image_size"] = [4096, 4096]  # 512 x 512 patches of 8
    _write(bad, card)
    with pytest.raises(CardError, match=r"field 'preprocessing\.image_size' \[4096, 4096\] makes 262144 patches"):
        resolve_encoder(parse_init(f"medmae:{bad}"))


def test_depth_256_by_embed_8192_fails_fast_without_allocating(export: Path, tmp_path: Path) -> None:
    """Each size within its own limit, together ~206e9 parameters (the issue's 4.9 GB first allocation)."""
    bad = _copy(export, tmp_path / "wide")
    card = _card(bad)
    card["encoder"].update(embed_dim=8192, kwargs={"depth": 256, "embed_dim": 8192, "num_heads": 64, "patch_size": 8})
    _write(bad, card)
    start = time.perf_counter()
    with pytest.raises(CardError, match=r"field 'encoder\.kwargs\.depth' gives 256 blocks of width 8192: about 206e9"):
        load_card(bad)
    assert time.perf_counter() - start < 5


@pytest.mark.slow
def test_depth_256_by_embed_8192_under_a_memory_limit(export: Path, tmp_path: Path) -> None:
    """The whole ``finetune-seg`` command under RLIMIT_AS = 6 GiB (importing torch maps ~4): one line and
    exit 2, never a MemoryError (the old code's first allocation alone was 4.9 GB)."""
    bad = _copy(export, tmp_path / "wide")
    card = _card(bad)
    card["encoder"].update(embed_dim=8192, kwargs={"depth": 256, "embed_dim": 8192, "num_heads": 64, "patch_size": 8})
    _write(bad, card)
    script = (
        "import resource, sys; resource.setrlimit(resource.RLIMIT_AS, (6 * 1024**3, 6 * 1024**3)); "
        "from medmae.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-c", script, "finetune-seg", "--config", str(REPO / "configs/finetune/seg_tiny_cpu.yaml"),
         "--model.init", f"medmae:{bad}", "--data.csv", str(tmp_path / "cases.csv"), "--trainer.logger", "false"],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "MemoryError" not in proc.stderr
    assert "encoder.kwargs.depth" in proc.stderr


def test_an_architecture_bigger_than_its_weights_is_refused_before_building(
    export: Path, tmp_path: Path, no_real_timm_build: None
) -> None:
    """vit_gigantic sizes, stated consistently, around the tiny weights: the header shapes decide, first."""
    bad = _copy(export, tmp_path / "gigantic")
    card = _card(bad)
    card["encoder"].update(arch="vit_gigantic_patch14_224", kwargs={}, img_size=[28, 28], patch_size=14,
                           embed_dim=1664)  # fmt: skip
    _write(bad, card)
    load_card(bad)  # a valid card: only the weights can tell
    shape = r"gigantic/encoder\.json: weights 'cls_token' have shape \[1, 1, 192\] .* needs \[1, 1, 1664\]"
    with pytest.raises(CardError, match=shape):
        load_timm_encoder(bad)


def test_an_architecture_that_contradicts_its_own_fields_is_refused(export: Path, tmp_path: Path) -> None:
    bad = _copy(export, tmp_path / "contradicts")
    card = _card(bad)
    card["encoder"]["arch"] = "vit_gigantic_patch14_224"  # kwargs keep depth 2 / patch 8, embed_dim 192
    _write(bad, card)
    with pytest.raises(CardError, match=r"field 'encoder\.embed_dim' is 192 but 'vit_gigantic_patch14_224'"):
        load_card(bad)


def test_more_blocks_than_the_weights_hold_is_refused_before_building(
    export: Path, tmp_path: Path, no_real_timm_build: None
) -> None:
    bad = _copy(export, tmp_path / "deeper")
    card = _card(bad)
    card["encoder"]["kwargs"]["depth"] = 12
    _write(bad, card)
    with pytest.raises(CardError, match=r"the weights lack \[blocks\.2\.norm1\.weight, .* \(120 in all\)\]"):
        resolve_encoder(parse_init(f"medmae:{bad}"))


# ----------------------------------------------------------------------------- export reads pretraining checkpoints


def _pretraining_ckpt(path: Path, edit: Any = None) -> Path:
    from medmae.train.module import MAEPretrainModule
    from tests.export.test_encoder import TINY_MODEL

    module = MAEPretrainModule(**TINY_MODEL)
    pre = CacheDataModule(str(path.parent / "no_cache"), img_size=64).preprocessing()
    ckpt = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
            "medmae": {"preprocessing": pre}, "global_step": 3, "epoch": 0}  # fmt: skip
    if edit is not None:
        edit(ckpt)
    torch.save(ckpt, str(path))
    return path


def test_export_of_a_sound_checkpoint_writes_a_loadable_card(tmp_path: Path) -> None:
    ckpt = _pretraining_ckpt(tmp_path / "good.ckpt")
    assert export_main([str(ckpt), "--out", str(tmp_path / "out")]) == 0
    assert preprocessing_from_card(load_card(tmp_path / "out")).image_size == (64, 64)


@pytest.mark.parametrize(
    ("case", "edit", "field"),
    [
        ("image_size", lambda c: c["medmae"]["preprocessing"].__setitem__("image_size", [65536, 65536]),
         "preprocessing.image_size"),
        ("percentiles", lambda c: c["medmae"]["preprocessing"]["intensity"]["other"].__setitem__(
            "percentiles", [float("nan"), 99.5]), "preprocessing.intensity.other.percentiles"),
        ("deep", lambda c: c["medmae"]["preprocessing"].__setitem__("extra", json.loads("[" * 100 + "]" * 100)),
         "preprocessing"),
        ("huge_mae", lambda c: c["hyper_parameters"].update(depth=256, embed_dim=8192, num_heads=64),
         "the checkpoint's MAE"),
        ("global_step", lambda c: c.__setitem__("global_step", "many"), "global_step"),
    ],
)  # fmt: skip
def test_export_refuses_a_hostile_pretraining_checkpoint_in_one_line(
    case: str, edit: Any, field: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = _pretraining_ckpt(tmp_path / f"{case}.ckpt", edit)
    with pytest.raises(SystemExit) as done:
        export_main([str(ckpt), "--out", str(tmp_path / "out")])
    assert done.value.code == 2
    line = _one_error_line(capsys)
    assert f"{case}.ckpt" in line and field in line, line
    assert not (tmp_path / "out" / "encoder.json").exists()
