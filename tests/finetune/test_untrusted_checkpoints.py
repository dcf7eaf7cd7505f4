"""Fine-tuning checkpoints are untrusted input (issue 18, rows 9 and 10).

A checkpoint that unpickles safely can still carry a tampered encoder record or hyper-parameters.
``predict-seg`` / ``predict-cls`` must refuse each in one line (exit 2) *before* building any real
network: the record goes through the card's validator and the stored tensors are compared with the
network it describes on the meta device. A planted ``__reduce__`` given to ``--ckpt_path`` of
``finetune-seg`` / ``finetune-cls`` / ``fit`` / ``validate`` is refused (never run) in one line too.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import torch

from medmae.data import CacheDataModule
from medmae.export import export_encoder
from medmae.finetune import cls_predict, segment
from medmae.finetune.classify import CKPT_KEY as CLS_KEY
from medmae.finetune.classify import ClassificationModule
from medmae.finetune.cls_cli import finetune_main as finetune_cls_main
from medmae.finetune.cls_predict import predict_main as predict_cls_main
from medmae.finetune.seg_cli import finetune_main as finetune_seg_main
from medmae.finetune.seg_cli import predict_main as predict_seg_main
from medmae.finetune.segment import CKPT_KEY as SEG_KEY
from medmae.finetune.segment import SegmentationModule
from medmae.models import create_mae
from medmae.train.cli import fit_main, validate_main

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def encoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("encoder")
    mae = create_mae("mae_vit_tiny_patch16", img_size=32, patch_size=8, depth=2, decoder_depth=1)
    export_encoder(mae, out, preprocessing=CacheDataModule(str(out / "no_cache"), img_size=32).preprocessing())
    return out


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("image") / "scan.nii.gz"
    data = np.random.default_rng(0).normal(100, 20, (32, 32, 3)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.diag([1.0, 1.0, 2.0, 1.0])), str(path))
    return path


@pytest.fixture(scope="module")
def seg_ckpt(encoder: Path) -> dict[str, Any]:
    """What ``finetune-seg`` writes (Lightning's keys and medmae's record), without a training run."""
    module = SegmentationModule(f"medmae:{encoder}", num_classes=3, feature_size=8, decoder="light")
    record = {**module.source_record, "inputs": {"nifti_modality": None}}
    return {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams), SEG_KEY: record,
            "epoch": 0, "global_step": 0}  # fmt: skip


@pytest.fixture(scope="module")
def cls_ckpt(encoder: Path) -> dict[str, Any]:
    module = ClassificationModule(f"medmae:{encoder}", task="binary")
    record = {**module.source_record, "task": "binary", "classes": ["0", "1"], "level": "slice",
              "inputs": {"nifti_modality": None, "max_planes": None}}  # fmt: skip
    return {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams), CLS_KEY: record,
            "epoch": 0, "global_step": 0}  # fmt: skip


@pytest.fixture
def meta_only_builds(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Make a real (non-meta) network build of a prediction command fail the test at once: a tampered
    record must be refused before anything is allocated."""
    devices: list[str] = []

    def spy(original: Callable[..., Any]) -> Callable[..., Any]:
        def build(*args: Any, **kwargs: Any) -> Any:
            devices.append(torch.get_default_device().type)
            assert devices[-1] == "meta", "a real network was built from a tampered checkpoint"
            return original(*args, **kwargs)

        return build

    monkeypatch.setattr(segment, "build_segmenter", spy(segment.build_segmenter))
    monkeypatch.setattr(cls_predict, "build_classifier", spy(cls_predict.build_classifier))
    return devices


def _tampered(ckpt: dict[str, Any], edit: Callable[[dict[str, Any]], None], path: Path) -> Path:
    bad = copy.deepcopy(ckpt)
    edit(bad)
    torch.save(bad, str(path))
    return path


def _one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def _record(key: str, *path: str) -> Callable[[dict[str, Any], Any], None]:
    """An edit setting ``ckpt[key][path...]`` (``_DEL``: removing it)."""

    def set_value(ckpt: dict[str, Any], value: Any) -> None:
        node = ckpt[key]
        for part in path[:-1]:
            node = node[part]
        if value is _DEL:
            del node[path[-1]]
        else:
            node[path[-1]] = value

    return set_value


_DEL = object()


def _edit(setter: Callable[[dict[str, Any], Any], None], value: Any) -> Callable[[dict[str, Any]], None]:
    return lambda ckpt: setter(ckpt, value)


def _big(arch: str, embed_dim: int, patch: int) -> Callable[[dict[str, Any]], None]:
    """A consistent record of a big timm ViT (its own sizes) around the tiny network's weights: only the
    comparison with the stored tensors can tell, and it must come before the multi-GB build."""

    def edit(ckpt: dict[str, Any]) -> None:
        rec = ckpt[SEG_KEY] if SEG_KEY in ckpt else ckpt[CLS_KEY]
        size = (2 * patch, 2 * patch)
        rec["encoder"].update(arch=arch, kwargs={}, img_size=size, patch_size=patch, embed_dim=embed_dim)
        rec["preprocessing"]["image_size"] = size

    return edit


_gigantic = _big("vit_gigantic_patch14_224", 1664, 14)  # 1.8e9 parameters
_huge16 = _big("vit_giant_patch16_gap_224", 1408, 16)  # the light decoder needs a power-of-two patch


def _deep(n: int) -> list[Any]:
    node: list[Any] = []
    for _ in range(n):
        node = [node]
    return node


SEG_KEYS = {
    "hp": lambda *p: _record("hyper_parameters", *p),
    "rec": lambda *p: _record(SEG_KEY, *p),
}
H, R = SEG_KEYS["hp"], SEG_KEYS["rec"]

SEG_TAMPERS: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {
    "arch_vit_gigantic": (_edit(R("encoder", "arch"), "vit_gigantic_patch14_224"), "encoder"),
    "arch_vit_giant_consistent": (_huge16, "weights"),
    "num_classes_1e9": (_edit(H("num_classes"), 10**9), "hyper_parameters.num_classes"),
    "feature_size_huge": (_edit(H("feature_size"), 10**7), "hyper_parameters.feature_size"),
    "feature_size_missing": (_edit(H("feature_size"), _DEL), "hyper_parameters.feature_size"),
    "decoder_unknown": (_edit(H("decoder"), "evil"), "hyper_parameters.decoder"),
    "kwargs_checkpoint_path": (_edit(R("encoder", "kwargs", "checkpoint_path"), "/etc/passwd"), "checkpoint_path"),
    "kwargs_pretrained_cfg_overlay": (
        _edit(R("encoder", "kwargs", "pretrained_cfg_overlay"), {"file": "/etc/passwd"}),
        "pretrained_cfg_overlay",
    ),
    "depth_256_embed_8192": (
        _edit(
            R("encoder"),
            {
                "arch": "vit_tiny_patch16_224",
                "kwargs": {"depth": 256, "embed_dim": 8192, "num_heads": 64, "patch_size": 8},
                "in_chans": 1,
                "img_size": (32, 32),
                "patch_size": 8,
                "embed_dim": 8192,
            },
        ),  # fmt: skip
        "parameters",
    ),
    "missing_state_dict": (lambda c: c.pop("state_dict"), "state_dict"),
    "no_network_weights": (lambda c: c.__setitem__("state_dict", {"other.x": torch.ones(1)}), "net"),
    "weight_shape_tampered": (
        lambda c: c["state_dict"].__setitem__("net.model.encoder.pos_embed", torch.zeros(1, 4097, 192)),
        "pos_embed",
    ),
    "missing_encoder_record": (_edit(R("encoder"), _DEL), "encoder"),
    "bad_axis": (_edit(R("preprocessing", "axis"), "oblique"), "preprocessing.axis"),
    "nan_percentiles": (_edit(R("preprocessing", "percentiles"), (float("nan"), 99.5)), "preprocessing.percentiles"),
    "image_size_65536": (_edit(R("preprocessing", "image_size"), (65536, 65536)), "preprocessing.image_size"),
    "inf_ct_window": (_edit(R("preprocessing", "ct_windows"), ((40.0, float("inf")),)), "preprocessing.ct_windows"),
    "input_norm_std_zero": (_edit(R("input_norm"), ([0.0], [0.0])), "input_norm.std"),
    "input_norm_nan_mean": (_edit(R("input_norm"), ([float("nan")], [1.0])), "input_norm.mean"),
    "spatial_dims_4": (_edit(R("spatial_dims"), 4), "spatial_dims"),
    "record_nested_deep": (_edit(R("extra"), _deep(100)), "record"),
    "inputs_not_a_mapping": (_edit(R("inputs"), ["CT"]), "inputs"),
}


def test_untampered_checkpoint_predicts(
    tmp_path: Path, seg_ckpt: dict[str, Any], image: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _tampered(seg_ckpt, lambda c: None, tmp_path / "good.ckpt")
    assert predict_seg_main([str(path), str(image), "--out", str(tmp_path / "masks")]) == 0
    assert (tmp_path / "masks" / "scan_seg.nii.gz").is_file()


@pytest.mark.parametrize("case", sorted(SEG_TAMPERS))
def test_tampered_segmentation_checkpoint_is_one_line_before_any_build(
    case: str,
    tmp_path: Path,
    seg_ckpt: dict[str, Any],
    image: Path,
    meta_only_builds: list[str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    edit, field = SEG_TAMPERS[case]
    path = _tampered(seg_ckpt, edit, tmp_path / f"{case}.ckpt")
    with pytest.raises(SystemExit) as done:
        predict_seg_main([str(path), str(image), "--out", str(tmp_path / "masks")])
    assert done.value.code == 2
    line = _one_error_line(capsys)
    assert line.startswith("medmae predict-seg: error:") and f"{case}.ckpt" in line and field in line, line
    assert not (tmp_path / "masks" / "scan_seg.nii.gz").exists()
    assert set(meta_only_builds) <= {"meta"}


C = lambda *p: _record(CLS_KEY, *p)  # noqa: E731
CH = lambda *p: _record("hyper_parameters", *p)  # noqa: E731

CLS_TAMPERS: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {
    "arch_vit_gigantic_consistent": (_gigantic, "weights"),
    "kwargs_checkpoint_path": (_edit(C("encoder", "kwargs", "checkpoint_path"), "/etc/passwd"), "checkpoint_path"),
    "input_norm_std_zero": (_edit(C("input_norm"), ([0.5], [0.0])), "input_norm.std"),
    "nan_percentiles": (_edit(C("preprocessing", "percentiles"), (0.5, float("nan"))), "preprocessing.percentiles"),
    "bad_axis": (_edit(C("preprocessing", "axis"), 7), "preprocessing.axis"),
    "unknown_task": (_edit(C("task"), "regression"), "record.task"),
    "unknown_pool": (_edit(CH("global_pool"), "gem"), "hyper_parameters.global_pool"),
    "infer_batch_zero": (_edit(CH("infer_batch"), 0), "hyper_parameters.infer_batch"),
    "missing_state_dict": (lambda c: c.pop("state_dict"), "state_dict"),
}


@pytest.mark.parametrize("case", sorted(CLS_TAMPERS))
def test_tampered_classification_checkpoint_is_one_line_before_any_build(
    case: str,
    tmp_path: Path,
    cls_ckpt: dict[str, Any],
    image: Path,
    meta_only_builds: list[str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    edit, field = CLS_TAMPERS[case]
    path = _tampered(cls_ckpt, edit, tmp_path / f"{case}.ckpt")
    with pytest.raises(SystemExit) as done:
        predict_cls_main([str(path), str(image), "--out", str(tmp_path / "probs.csv")])
    assert done.value.code == 2
    line = _one_error_line(capsys)
    assert line.startswith("medmae predict-cls: error:") and field in line, line
    assert not (tmp_path / "probs.csv").exists()
    assert set(meta_only_builds) <= {"meta"}


def test_untampered_classification_checkpoint_predicts(tmp_path: Path, cls_ckpt: dict[str, Any], image: Path) -> None:
    path = _tampered(cls_ckpt, lambda c: None, tmp_path / "good.ckpt")
    assert predict_cls_main([str(path), str(image), "--out", str(tmp_path / "probs.csv")]) == 0


# ----------------------------------------------------------------------------- --ckpt_path: planted code


class Planted:
    """Unpickling this runs ``touch MARKER`` (what a hostile checkpoint would do with full unpickling)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def planted(tmp_path: Path) -> tuple[Path, Path]:
    marker = tmp_path / "marker"
    path = tmp_path / "planted.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {}, "payload": Planted(marker)}, str(path))
    return path, marker


def _finetune_seg(encoder: Path, tmp_path: Path, ckpt: Path) -> None:
    finetune_seg_main([
        "--config", str(REPO / "configs/finetune/seg_tiny_cpu.yaml"), "--model.init", f"medmae:{encoder}",
        "--data.csv", str(tmp_path / "cases.csv"), "--trainer.default_root_dir", str(tmp_path),
        "--trainer.logger", "false", "--ckpt_path", str(ckpt),
    ])  # fmt: skip


def _finetune_cls(encoder: Path, tmp_path: Path, ckpt: Path) -> None:
    finetune_cls_main([
        "--config", str(REPO / "configs/finetune/cls_tiny_cpu.yaml"), "--model.init", f"medmae:{encoder}",
        "--data.csv", str(tmp_path / "labels.csv"), "--trainer.default_root_dir", str(tmp_path),
        "--trainer.logger", "false", "--ckpt_path", str(ckpt),
    ])  # fmt: skip


def _pretrain(command: Callable[[list[str]], int]) -> Callable[[Path, Path, Path], None]:
    def run(encoder: Path, tmp_path: Path, ckpt: Path) -> None:
        command([
            "--config", str(REPO / "configs/pretrain/tiny_cpu.yaml"), "--data.cache_dir", str(tmp_path / "cache"),
            "--trainer.logger", "false", "--trainer.default_root_dir", str(tmp_path), "--ckpt_path", str(ckpt),
        ])  # fmt: skip

    return run


COMMANDS = {
    "finetune-seg": _finetune_seg,
    "finetune-cls": _finetune_cls,
    "fit": _pretrain(fit_main),
    "validate": _pretrain(validate_main),
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_planted_reduce_in_ckpt_path_is_refused_in_one_line(
    command: str, tmp_path: Path, encoder: Path, planted: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    path, marker = planted
    with pytest.raises(SystemExit) as done:
        COMMANDS[command](encoder, tmp_path, path)
    assert done.value.code == 2
    line = _one_error_line(capsys)
    assert line.startswith(f"medmae {command}: error:") and "planted.ckpt" in line and "posix.system" in line, line
    assert not marker.exists()


def test_resumed_segmentation_hyper_parameters_are_bounded(
    tmp_path: Path, encoder: Path, seg_ckpt: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    """LightningCLI builds the resumed model with the checkpoint's hyper-parameters: 1e9 classes stop in
    one line, not at a 64 GB allocation."""
    path = _tampered(seg_ckpt, _edit(H("num_classes"), 10**9), tmp_path / "resume.ckpt")
    with pytest.raises(SystemExit) as done:
        _finetune_seg(encoder, tmp_path, path)
    assert done.value.code == 2
    line = _one_error_line(capsys)
    assert "resume.ckpt" in line and "hyper_parameters.num_classes" in line, line


def test_validate_refuses_a_checkpoint_whose_tensors_do_not_fit_its_mae(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A safe pickle with hyper-parameters for a huge MAE (256 blocks of width 8192) and a tiny state:
    compared on the meta device, refused before LightningCLI would allocate it."""
    from medmae.train.module import MAEPretrainModule
    from tests.export.test_encoder import TINY_MODEL

    module = MAEPretrainModule(**TINY_MODEL)
    hp = {**dict(module.hparams), "depth": 256, "embed_dim": 8192, "num_heads": 64}
    path = tmp_path / "huge.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": hp}, str(path))
    with pytest.raises(SystemExit) as done:
        _pretrain(validate_main)(tmp_path, tmp_path, path)
    assert done.value.code == 2
    line = _one_error_line(capsys)
    assert line.startswith("medmae validate: error:") and "huge.ckpt" in line, line
