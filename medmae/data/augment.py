"""Random geometry and intensity changes of 2D training images (``data.augment``), after preprocessing.

:class:`PlaneAugment` changes pretraining batches; :func:`augment_planes` applies the same options to one
fine-tuning sample, its label plane following the geometry (``medmae.finetune.samples``).

Why: an MAE pretrained on a small archive (one template, a few hundred planes) learns that archive's
exact anatomy and scanner. Rotating, zooming and re-shading each training crop shows the encoder the
kind of variation a new patient brings (position, head size, coil shading, contrast), which MAE's
crop-and-flip recipe — designed for a million photographs — does not. docs/transfer.md measures it.

What is done to each training image of a batch, in this order, on whatever device the batch is on:

1. **rotation and zoom** about the image centre: angle uniform in ``±rotate_deg``, zoom log-uniform in
   ``scale`` (> 1 enlarges), bilinear; what comes in from outside the image is 0 (the low end of the
   intensity range: air, background);
2. **bias field**: the image times ``exp(p(x, y))``, ``p`` a degree-2 polynomial on ``[-1, 1]²`` whose
   five coefficients (x, y, xy, x²−⅓, y²−⅓) are uniform in ``±bias_field``;
3. **gamma**: ``image ** g``, ``g`` log-uniform in ``gamma``; clipped to ``[0, 1]``.

Randomness: in pretraining every parameter is drawn on the host from ``(seed, rank, epoch, batch number)``,
the batch's own position in the training stream, so a resumed run draws the very augmentations of an
uninterrupted one, and ranks differ; in fine-tuning from the sample's ``(seed, epoch, index)`` generator.
Validation batches and the card's inference preprocessing are never augmented.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from medmae.data.options import AugmentOptions
from medmae.data.sampler import STREAM_AUGMENT


class PlaneAugment:
    """Applies :class:`~medmae.data.options.AugmentOptions` to ``(B, C, H, W)`` batches in ``[0, 1]``.

    Examples::

        aug = PlaneAugment(AugmentOptions(rotate_deg=15, scale=(0.87, 1.15), gamma=(0.7, 1.4), bias_field=0.05))
        images = aug(images, aug.generator(seed=0, rank=0, epoch=3, number=17))
    """

    def __init__(self, options: AugmentOptions) -> None:
        self.options = options

    @property
    def active(self) -> bool:
        """Whether any change is made (all defaults: the batch is returned untouched)."""
        return self.options.active

    @staticmethod
    def generator(seed: int, rank: int, epoch: int, number: int) -> torch.Generator:
        """The host generator of one training batch's draws (stateless: a resumed run redraws them)."""
        state = np.random.SeedSequence([seed, STREAM_AUGMENT, rank, epoch, number]).generate_state(2, np.uint32)
        return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if not self.active:
            return images
        if images.ndim != 4:
            raise ValueError(f"data.augment takes (B, C, H, W) image batches, got shape {tuple(images.shape)}")
        o = self.options
        b = images.shape[0]

        def uniform(n: int = 1) -> torch.Tensor:  # in [-1, 1), drawn on the host, in a fixed order
            return torch.rand(b, n, generator=generator, dtype=torch.float64) * 2 - 1

        angle, zoom = uniform()[:, 0] * math.radians(o.rotate_deg), uniform()[:, 0]
        log_lo, log_hi = math.log(o.scale[0]), math.log(o.scale[1])
        zoom = torch.exp(log_lo + (zoom + 1) / 2 * (log_hi - log_lo))
        coeffs = uniform(5) * o.bias_field
        g_lo, g_hi = math.log(o.gamma[0]), math.log(o.gamma[1])
        gamma = torch.exp(g_lo + (uniform()[:, 0] + 1) / 2 * (g_hi - g_lo))
        return _transform(images, o, angle, zoom, coeffs, gamma)

    def describe(self) -> dict[str, Any]:
        """JSON-able record for the preprocessing record (training crops only; inference never augments)."""
        o = self.options
        return {
            "applies_to": "training crops of pretraining, after intensity; never validation or inference",
            "order": "rotate+zoom (bilinear, 0 outside) -> x exp(degree-2 polynomial) -> clip [0, 1] -> gamma",
            "rotate_deg": o.rotate_deg,
            "scale": list(o.scale),
            "gamma": list(o.gamma),
            "bias_field": o.bias_field,
            "seeded_by": "(data.seed, rank, epoch, batch number)",
        }


def augment_planes(
    images: torch.Tensor, options: AugmentOptions, rng: np.random.Generator, label: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One draw of ``options`` applied to fine-tuning planes ``(..., C, H, W)`` in ``[0, 1]`` and, when given,
    to their ``(H, W)`` label plane (the same rotation and zoom, nearest neighbour, background from outside).

    Fine-tuning's counterpart of :class:`PlaneAugment`: the same transforms in the same order, drawn from
    the training sample's own generator (:class:`~medmae.finetune.samples.EpochDataset`), so a sample stays
    a pure function of ``(seed, epoch, index)``. All planes of one call (a series) share the draw.
    """
    if not options.active:
        return images, label
    o = options
    angle = math.radians(o.rotate_deg) * rng.uniform(-1.0, 1.0)
    zoom = math.exp(rng.uniform(math.log(o.scale[0]), math.log(o.scale[1])))
    coeffs = rng.uniform(-1.0, 1.0, size=5) * o.bias_field
    gamma = math.exp(rng.uniform(math.log(o.gamma[0]), math.log(o.gamma[1])))
    flat = images.reshape(-1, *images.shape[-3:])
    n = flat.shape[0]
    angles = torch.full((n,), angle, dtype=torch.float64)
    zooms = torch.full((n,), zoom, dtype=torch.float64)
    out = _transform(flat, o, angles, zooms, torch.from_numpy(coeffs).expand(n, 5), torch.full((n,), gamma))
    if label is not None and o.geometric:
        warped = _rotate_zoom(label[None, None].float(), angles[:1], zooms[:1], mode="nearest")
        label = warped[0, 0].round().to(label.dtype)
    return out.reshape(images.shape).contiguous(), label


def _transform(
    images: torch.Tensor,
    o: AugmentOptions,
    angle: torch.Tensor,
    zoom: torch.Tensor,
    coeffs: torch.Tensor,
    gamma: torch.Tensor,
) -> torch.Tensor:
    """Rotate+zoom, bias field, clip, gamma of ``(B, C, H, W)`` with one drawn parameter set per image."""
    out = images
    if o.geometric:
        out = _rotate_zoom(out, angle, zoom)
    if o.bias_field > 0:
        out = out * _bias_field(coeffs, out.shape[-2:], out.device).to(out.dtype)
    out = out.clamp(0.0, 1.0)
    if o.gamma != (1.0, 1.0):
        out = out.pow(gamma.to(device=out.device, dtype=out.dtype).view(-1, 1, 1, 1))
    return out


def _rotate_zoom(images: torch.Tensor, angle: torch.Tensor, zoom: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
    """Rotate by ``angle`` (radians) and enlarge by ``zoom`` about the centre; 0 comes in from outside.

    ``affine_grid`` maps output to input coordinates, so the matrix is the inverse transform: a zoom
    by ``z`` samples the input at ``1/z`` of the distance. Non-square images rotate in pixel units.
    """
    b, _, h, w = images.shape
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    aspect = w / h  # normalised coordinates run over [-1, 1] on both axes: correct for the aspect
    theta = torch.zeros(b, 2, 3, dtype=torch.float64)
    theta[:, 0, 0], theta[:, 0, 1] = cos, -sin / aspect
    theta[:, 1, 0], theta[:, 1, 1] = sin * aspect, cos
    theta = theta.to(device=images.device, dtype=images.dtype)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode=mode, padding_mode="zeros", align_corners=False)


def _bias_field(
    coeffs: torch.Tensor, size: tuple[int, int] | torch.Size, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """``exp`` of a degree-2 polynomial per image, ``(B, 1, H, W)``: a smooth multiplicative shading.

    Built on ``device`` from the five host-drawn coefficients per image, so a GPU batch never waits
    on a host-to-device copy of a whole field.
    """
    h, w = int(size[0]), int(size[1])
    coeffs = coeffs.to(device=device, dtype=torch.float64)
    y = torch.linspace(-1, 1, h, dtype=torch.float64, device=device).view(1, h, 1)
    x = torch.linspace(-1, 1, w, dtype=torch.float64, device=device).view(1, 1, w)
    terms = (x, y, x * y, x * x - 1 / 3, y * y - 1 / 3)
    log_field = sum(coeffs[:, k].view(-1, 1, 1) * term for k, term in enumerate(terms))
    return torch.exp(log_field).unsqueeze(1).float()
