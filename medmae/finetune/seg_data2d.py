"""Labelled volumes -> encoder-grid planes for fine-tuning a 2D / 2.5D encoder (the 2D half of
:mod:`medmae.finetune.seg_data`; :mod:`medmae.finetune.seg_data3d` is the 3D half).

Every plane goes through the card's :class:`~medmae.data.plane_transform.PlanePreprocessor` for the
image's kind (a single 2D picture is its one plane under every axis), once at setup.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from medmae.data.plane_transform import PlanePreprocessor
from medmae.finetune.cases import Case
from medmae.finetune.volumes import read_image, read_label


@dataclass
class PreparedCase:
    """A case after preprocessing: encoder-grid planes, labels on that grid, and the original label stack."""

    images: torch.Tensor  # (Z, C, H, W) float32
    labels: torch.Tensor  # (Z, H, W) int64 on the encoder grid
    label_stack: np.ndarray  # (Z, h, w) uint8 planes at the original resolution
    plane_shape: tuple[int, int]


def prepare_case(
    case: Case, pre: PlanePreprocessor, num_classes: int, modality: str | None, cache_dir: str | None
) -> PreparedCase:
    image = read_image(case.image, modality=case.modality or modality, cache_dir=cache_dir)
    label = read_label(str(case.label), image, num_classes)
    pre = pre.for_input(image.kind)
    stack = np.ascontiguousarray(pre.stack(label))
    return PreparedCase(
        images=pre.forward(image.array, image.intensity, image.stats, spacing=image.spacing),
        labels=pre.labels(label),
        label_stack=stack,
        plane_shape=tuple(stack.shape[1:]),  # type: ignore[arg-type]
    )
