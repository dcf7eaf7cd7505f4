"""The fair baseline ``random-sincos:DIR``: exactly the pretrained network's position embeddings, and
every other weight exactly ``random:DIR``'s at the same seed (issue 17, item 2), for the 2D UNETR and
light decoders, the classifier and the 3D UNETR."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from medmae.finetune.classify import ClassificationModule
from medmae.finetune.encoders import POSITION_PARAMETERS, parse_init
from medmae.finetune.segment import SegmentationModule
from tests.finetune.test_classify import cls_encoder  # noqa: F401 - fixture
from tests.finetune.test_segment import seg_encoder  # noqa: F401 - fixture
from tests.finetune.test_segment3d import encoder3d  # noqa: F401 - fixture


def _nets(make: Callable[[str], nn.Module], export: Path) -> dict[str, dict[str, torch.Tensor]]:
    out = {}
    for kind in ("medmae", "random", "random-sincos"):
        torch.manual_seed(0)
        out[kind] = {n: p.detach().clone() for n, p in make(f"{kind}:{export}").named_parameters()}
    return out


def _check(nets: dict[str, dict[str, torch.Tensor]]) -> None:
    positions = [n for n in nets["random"] if n.rsplit(".", 1)[-1] in POSITION_PARAMETERS]
    assert positions
    for name, value in nets["random-sincos"].items():
        if name in positions:
            assert torch.equal(value, nets["medmae"][name]), name
            assert not torch.equal(value, nets["random"][name]), name
        else:
            assert torch.equal(value, nets["random"][name]), name
    assert any(not torch.equal(nets["medmae"][n], nets["random"][n]) for n in nets["random"] if n not in positions)


@pytest.mark.parametrize("decoder", ["unetr", "light"])
def test_random_sincos_segmenter_has_the_pretrained_positions_only(seg_encoder: Path, decoder: str) -> None:  # noqa: F811
    _check(_nets(lambda init: SegmentationModule(init, num_classes=3, feature_size=8, decoder=decoder), seg_encoder))


def test_random_sincos_classifier_has_the_pretrained_positions_only(cls_encoder: Path) -> None:  # noqa: F811
    _check(_nets(lambda init: ClassificationModule(init, task="binary"), cls_encoder))


def test_random_sincos_unetr3d_has_the_pretrained_positions_only(encoder3d: Path) -> None:  # noqa: F811
    _check(_nets(lambda init: SegmentationModule(init, num_classes=2, feature_size=8), encoder3d))


def test_random_sincos_parses_and_is_recorded(seg_encoder: Path) -> None:  # noqa: F811
    init = parse_init(f"random-sincos:{seg_encoder}")
    assert init.kind == "random-sincos" and init.describe() == f"random-sincos:{seg_encoder.name}"
    with pytest.raises(ValueError, match="random-sincos:DIR"):
        parse_init("random-cosine:x")
