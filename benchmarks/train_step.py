"""One full MAE training step (forward, loss, backward, AdamW step): medmae vs lightly vs MONAI, 2D or 3D.

Each implementation is built the way its authors show it, at the same sizes (encoder, decoder, image,
channels, batch, mask ratio 0.75), and trained with the same optimizer: ``torch.optim.AdamW``, betas
(0.9, 0.95), weight decay 0.05 on weight matrices only, the same lr, ``fused=True`` (what medmae's
Lightning module uses without a GradScaler; available on CPU and CUDA, so all three get it).

* medmae  -- ``medmae.models.create_mae("mae_vit_<size>_patch16")`` with its default recipe
  (norm-pix loss on; its per-patch normalisation is a few element-wise ops on the target).
* lightly -- lightly's MAE example: ``MaskedVisionTransformerTIMM`` around a timm ViT,
  ``MaskedVisionTransformerDecoderTIMM`` (lightly >= 1.6; the deprecated ``MAEDecoderTIMM`` on older
  lightly), ``utils.random_token_mask`` / ``set_at_index`` / ``get_at_index`` / ``patchify``, MSE on the
  masked patches.
* monai   -- ``monai.networks.nets.MaskedAutoEncoderViT`` (spatial_dims=2, qkv_bias=True to match timm's
  ViT), MSE over the patches its returned mask marks as masked.

``--3d`` times the volumetric MAE instead (defaults: 96³ volumes, batch 2, decoder 384 x 4 x 12, the
decoder of medmae's 3D MAE and MONAI's defaults): medmae ``create_mae3d("mae3d_vit_<size>_patch16")``
against MONAI ``MaskedAutoEncoderViT(spatial_dims=3)``; lightly has no 3D MAE. In 3D MONAI's loss is
given medmae's norm-pix target (each target patch normalised to mean 0, variance 1, then the MSE over
the masked patches), so both models compute the same loss on the same patch vectors.

Timing: ``--warmup`` steps per model, then ``--steps`` rounds; each round times one step of every model in
turn (A B C A B C ...), synchronising on CUDA, so slow drift of the machine hits all models alike.
Memory: every model is trained for a few steps alone in a fresh subprocess (``--no-memory`` skips it);
on CPU the number is the peak RSS minus the RSS before the model was built (parameters, gradients,
AdamW state, activations and allocator slack), on CUDA ``torch.cuda.max_memory_allocated``.

Peers are optional (``pip install -e .[bench]``); the script says which it could not import and runs
the rest. Example (the README table)::

    python benchmarks/train_step.py --model small --img-size 224 --channels 1 --batch 16 --threads 2
    python benchmarks/train_step.py --device cuda --precision bf16 --model base --batch 256 --compile
    python benchmarks/train_step.py --3d --model small --threads 1 --steps 20       # 3D, 96³, batch 2
    python benchmarks/train_step.py --3d --device cuda --precision bf16 --model base --batch 32 --compile
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cpu_model, usable_cores  # noqa: E402

# encoder sizes: width, depth, heads (MLP ratio 4, patch 16)
SIZES = {"tiny": (192, 12, 3), "small": (384, 12, 6), "base": (768, 12, 12), "large": (1024, 24, 16)}
PEERS = ("medmae", "lightly", "monai")
IMPORTS = {
    "medmae": ("timm", "medmae.models"),
    "lightly": ("timm", "lightly.models.utils", "lightly.models.modules"),
    "monai": ("monai.networks.nets",),
}
MASK_RATIO = 0.75
#: defaults that depend on the dimension: (2D, 3D)
DEFAULTS = {
    "img_size": (224, 96),
    "batch": (16, 2),
    "decoder_dim": (512, 384),
    "decoder_depth": (8, 4),
    "decoder_heads": (16, 12),
    "peers": (",".join(PEERS), "medmae,monai"),
}
# parameter names (suffixes) without weight decay besides every bias / norm weight, for all three models
NO_DECAY = ("pos_embed", "cls_token", "mask_token", "mask_tokens", "position_embeddings", "decoder_pos_embedding")


@dataclass
class Bench:
    """A model, its optimizer, and the callable that runs forward + loss on a batch."""

    name: str
    classes: str
    model: nn.Module
    loss_fn: Callable[[torch.Tensor], torch.Tensor]
    note: str = ""
    optimizer: torch.optim.Optimizer | None = None


# ---------------------------------------------------------------------------------------------- builders


def build_medmae(a: argparse.Namespace) -> Bench:
    from medmae.models import create_mae, create_mae3d

    width, depth, heads = SIZES[a.model]
    model = (create_mae3d if a.dims == 3 else create_mae)(
        f"mae{'3d' if a.dims == 3 else ''}_vit_{a.model}_patch16",
        in_chans=a.channels,
        img_size=a.img_size,
        mask_ratio=MASK_RATIO,
        patch_size=a.patch_size,
        decoder_embed_dim=a.decoder_dim,
        decoder_depth=a.decoder_depth,
        decoder_num_heads=a.decoder_heads,
    )
    assert (model.encoder.embed_dim, len(model.encoder.blocks)) == (width, depth)
    model.to(a.device)
    # masks come from an explicit generator on the model's device, as in MAEPretrainModule.training_step
    gen = torch.Generator(device=a.device).manual_seed(0)

    def loss_fn(imgs: torch.Tensor) -> torch.Tensor:
        return model(imgs, generator=gen).loss

    return Bench("medmae", f"medmae.models.{type(model).__name__}", model, loss_fn)


class LightlyMAE(nn.Module):
    """lightly's MAE example (examples/pytorch_lightning/mae.py), sizes and channels made configurable."""

    def __init__(self, vit: nn.Module, in_chans: int, decoder_dim: int, decoder_depth: int, decoder_heads: int):
        super().__init__()
        from lightly.models.modules import MaskedVisionTransformerTIMM

        self.mask_ratio = MASK_RATIO
        self.patch_size = vit.patch_embed.patch_size[0]
        self.backbone = MaskedVisionTransformerTIMM(vit=vit)
        self.sequence_length = self.backbone.sequence_length
        num_patches = vit.patch_embed.num_patches
        try:  # lightly >= 1.6: decoder without embed / prediction head
            from lightly.models.modules import MaskedVisionTransformerDecoderTIMM
        except ImportError:
            MaskedVisionTransformerDecoderTIMM = None  # noqa: N806
        if MaskedVisionTransformerDecoderTIMM is not None:
            self.legacy = False
            self.decoder_embed = nn.Linear(vit.embed_dim, decoder_dim)
            self.decoder = MaskedVisionTransformerDecoderTIMM(
                num_patches=num_patches,
                embed_dim=decoder_dim,
                depth=decoder_depth,
                num_heads=decoder_heads,
                num_prefix_tokens=vit.num_prefix_tokens,
                mlp_ratio=4.0,
                proj_drop_rate=0.0,
                attn_drop_rate=0.0,
            )
            self.prediction_head = nn.Linear(decoder_dim, self.patch_size**2 * in_chans)
        else:  # older lightly: the (now deprecated) MAEDecoderTIMM, as lightly's older example
            from lightly.models.modules import MAEDecoderTIMM

            self.legacy = True
            self.decoder = MAEDecoderTIMM(
                num_patches=num_patches,
                patch_size=self.patch_size,
                in_chans=in_chans,
                embed_dim=vit.embed_dim,
                decoder_embed_dim=decoder_dim,
                decoder_depth=decoder_depth,
                decoder_num_heads=decoder_heads,
                mlp_ratio=4.0,
                proj_drop_rate=0.0,
                attn_drop_rate=0.0,
            )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        from lightly.models import utils

        batch_size = images.shape[0]
        idx_keep, idx_mask = utils.random_token_mask(
            size=(batch_size, self.sequence_length), mask_ratio=self.mask_ratio, device=images.device
        )
        x_encoded = self.backbone.encode(images=images, idx_keep=idx_keep)
        if self.legacy:
            x_decode = self.decoder.embed(x_encoded)
            x_masked = utils.repeat_token(self.decoder.mask_token, (batch_size, self.sequence_length))
            x_masked = utils.set_at_index(x_masked, idx_keep, x_decode.type_as(x_masked))
            x_decoded = self.decoder.decode(x_masked)
            x_pred = self.decoder.predict(utils.get_at_index(x_decoded, idx_mask))
        else:
            x_decode = self.decoder_embed(x_encoded)
            x_masked = x_decode.new_zeros(batch_size, self.sequence_length, x_decode.shape[-1])
            x_masked = utils.set_at_index(x_masked, idx_keep, x_decode.type_as(x_masked))
            x_decoded = self.decoder(x_masked, idx_mask=idx_mask)
            x_pred = self.prediction_head(utils.get_at_index(x_decoded, idx_mask))
        patches = utils.patchify(images, self.patch_size)
        target = utils.get_at_index(patches, idx_mask - 1)  # idx_mask counts the class token
        return F.mse_loss(x_pred.float(), target.float())


def build_lightly(a: argparse.Namespace) -> Bench:
    import timm

    width, depth, heads = SIZES[a.model]
    vit = timm.create_model(
        f"vit_{a.model}_patch16_224",
        pretrained=False,
        in_chans=a.channels,
        img_size=a.img_size,
        patch_size=a.patch_size,
        num_classes=0,  # lightly's example keeps timm's 1000-class head, unused; dropped here
    )
    model = LightlyMAE(vit, a.channels, a.decoder_dim, a.decoder_depth, a.decoder_heads).to(a.device)
    decoder = "MAEDecoderTIMM (deprecated)" if model.legacy else "MaskedVisionTransformerDecoderTIMM"
    return Bench("lightly", f"MaskedVisionTransformerTIMM + {decoder}", model, model)


def build_monai(a: argparse.Namespace) -> Bench:
    from monai.networks.nets import MaskedAutoEncoderViT

    width, depth, heads = SIZES[a.model]
    model = MaskedAutoEncoderViT(
        in_channels=a.channels,
        img_size=a.img_size,
        patch_size=a.patch_size,
        hidden_size=width,
        mlp_dim=4 * width,
        num_layers=depth,
        num_heads=heads,
        masking_ratio=MASK_RATIO,
        decoder_hidden_size=a.decoder_dim,
        decoder_mlp_dim=4 * a.decoder_dim,
        decoder_num_layers=a.decoder_depth,
        decoder_num_heads=a.decoder_heads,
        spatial_dims=a.dims,
        qkv_bias=True,  # MONAI's default is False; timm's ViT (medmae, lightly) has qkv bias
    ).to(a.device)

    def loss_fn(imgs: torch.Tensor) -> torch.Tensor:
        pred, mask = model(imgs)  # (B, N, p^d*C), (B, N) int with 1 = masked
        target = patchify(imgs.float(), a.patch_size)
        if a.dims == 3:  # medmae's norm-pix target (MAEBase.target_patches), see the module docstring
            target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
        per_patch = (pred.float() - target).pow(2).mean(dim=-1)
        mask = mask.to(per_patch.dtype)
        return (per_patch * mask).sum() / mask.sum()

    return Bench("monai", "monai.networks.nets.MaskedAutoEncoderViT", model, loss_fn)


def patchify(imgs: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, *S) -> (B, N, p^d * C): patches in row-major grid order (MONAI's token order), (p.., C) vectors."""
    b, c, *sides = imgs.shape
    d = len(sides)
    x = imgs.reshape(b, c, *[v for n in sides for v in (n // p, p)])
    x = x.permute(0, *range(2, 2 + 2 * d, 2), *range(3, 3 + 2 * d, 2), 1)
    return x.reshape(b, -1, p**d * c)


def make_input(a: argparse.Namespace) -> torch.Tensor:
    """One batch of random images (B, C, H, W) or volumes (B, C, S, S, S)."""
    return torch.randn(a.batch, a.channels, *[a.img_size] * a.dims, device=a.device)


BUILDERS: dict[str, Callable[[argparse.Namespace], Bench]] = {
    "medmae": build_medmae,
    "lightly": build_lightly,
    "monai": build_monai,
}
COMPILED = "+compile"


def build(name: str, a: argparse.Namespace) -> Bench:
    """Build a peer; ``<peer>+compile`` compiles it in place the way its users would: medmae as
    ``model.compile: true`` does (``compile_blocks``: encoder and decoder blocks, static shapes),
    lightly and MONAI as a whole module (``nn.Module.compile``)."""
    torch.manual_seed(0)
    base = name.removesuffix(COMPILED)
    bench = BUILDERS[base](a)
    if name.endswith(COMPILED):
        if base == "medmae":
            bench.model.compile_blocks()
            how = "compile_blocks()"
        else:
            bench.model.compile()
            how = "nn.Module.compile()"
        bench = Bench(name, f"{bench.classes} + {how}", bench.model, bench.loss_fn)
    bench.model.train()
    bench.optimizer = torch.optim.AdamW(
        decay_groups(bench.model, a.weight_decay), lr=a.lr, betas=(0.9, 0.95), fused=a.fused or None
    )
    return bench


def decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """The same rule for every model: no decay on biases, norms, positions and tokens."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 or name.endswith(NO_DECAY) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# ---------------------------------------------------------------------------------------------- the step


def make_step(bench: Bench, a: argparse.Namespace) -> Callable[[torch.Tensor], float]:
    device_type = torch.device(a.device).type
    autocast = (
        (lambda: torch.autocast(device_type, dtype=torch.bfloat16)) if a.precision == "bf16" else contextlib.nullcontext
    )
    opt = bench.optimizer
    assert opt is not None

    def step(imgs: torch.Tensor) -> float:
        """One training step; returns its wall time in seconds."""
        if device_type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with autocast():
            loss = bench.loss_fn(imgs)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device_type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    return step


def train_flops_per_image(a: argparse.Namespace) -> float:
    """Matmul FLOPs of one training step per image: ``medmae.models.flops`` (the formula the training
    logs use for MFU), on the benchmark's model size."""
    from medmae.models.flops import mae_train_flops

    width, depth, _ = SIZES[a.model]
    return mae_train_flops(
        num_patches=(a.img_size // a.patch_size) ** a.dims,
        patch_dim=a.patch_size**a.dims * a.channels,
        embed_dim=width,
        depth=depth,
        decoder_dim=a.decoder_dim,
        decoder_depth=a.decoder_depth,
        mask_ratio=MASK_RATIO,
    )


# ---------------------------------------------------------------------------------------------- memory


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def memory_worker(a: argparse.Namespace) -> None:
    """Train one model alone for a few steps and print its peak memory as one JSON line."""
    torch.set_num_threads(a.threads)
    name = a.memory_worker
    # import the libraries and wake torch's kernels up before the baseline, so that neither counts
    for module in IMPORTS[name.split("+")[0]]:
        importlib.import_module(module)
    w = torch.randn(64, 64, device=a.device, requires_grad=True)
    (w @ w).sum().backward()
    imgs = make_input(a)
    cuda = torch.device(a.device).type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_kib("VmRSS") * 1024
        try:  # reset the peak-RSS watermark (VmHWM) to the current RSS
            Path("/proc/self/clear_refs").write_text("5")
            hwm = "VmHWM"
        except OSError:
            hwm = ""
    bench = build(name, a)
    step = make_step(bench, a)
    for _ in range(3):  # step 1 creates the AdamW state; later steps hold it plus activations and grads
        step(imgs)
    if cuda:
        peak = torch.cuda.max_memory_allocated() - base
        how = "torch.cuda.max_memory_allocated"
    elif hwm:
        peak = _rss_kib(hwm) * 1024 - base
        how = "peak RSS (VmHWM) - RSS before building the model"
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
        how = "ru_maxrss - RSS before building the model"
    print(json.dumps({"name": name, "peak_bytes": peak, "how": how}))


def measure_memory(name: str, a: argparse.Namespace) -> tuple[float | None, str]:
    cmd = [sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--memory-worker", name]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            res = json.loads(line)
            return res["peak_bytes"] / 2**20, res["how"]
    print(f"  memory worker for {name} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
    return None, "failed"


# ---------------------------------------------------------------------------------------------- report


def version(pkg: str) -> str:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return "-"


def machine_line(a: argparse.Namespace) -> str:
    cpu, cores = cpu_model(), usable_cores()
    parts = [f"CPU {cpu} ({cores} cores usable)", f"torch threads {torch.get_num_threads()}"]
    if torch.device(a.device).type == "cuda":
        parts.insert(0, f"GPU {torch.cuda.get_device_name()}")
    vers = ", ".join(f"{p} {version(p)}" for p in ("torch", "timm", "monai", "lightly"))
    return f"{'; '.join(parts)}; Python {platform.python_version()}; {vers}"


def loadavg() -> str:
    """1-minute load average: above the thread count means something else competed for the cores."""
    return f"{os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else "n/a"


def quantiles(xs: list[float]) -> tuple[float, float, float]:
    if len(xs) < 2:
        return xs[0], xs[0], xs[0]
    q1, q2, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    return q1, q2, q3


def count_params(bench: Bench, imgs: torch.Tensor, a: argparse.Namespace) -> tuple[int, int]:
    """(trainable parameters, trainable parameters that get no gradient from a backward of the loss)."""
    assert bench.optimizer is not None
    bench.optimizer.zero_grad(set_to_none=True)
    with torch.autocast(torch.device(a.device).type, dtype=torch.bfloat16, enabled=a.precision == "bf16"):
        loss = bench.loss_fn(imgs)
    loss.backward()
    trainable = [p for p in bench.model.parameters() if p.requires_grad]
    unused = sum(p.numel() for p in trainable if p.grad is None)
    bench.optimizer.zero_grad(set_to_none=True)
    return sum(p.numel() for p in trainable), unused


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=sorted(SIZES), default="small", help="encoder size (ViT-*/16)")
    ap.add_argument("--3d", dest="three_d", action="store_true", help="volumetric MAE: medmae vs MONAI (3D)")
    ap.add_argument("--img-size", type=int, default=None, help="image / volume side (default 224; 3D: 96)")
    ap.add_argument("--patch-size", type=int, default=16)
    ap.add_argument("--channels", type=int, default=1)
    ap.add_argument("--batch", type=int, default=None, help="default 16; 3D: 2")
    ap.add_argument("--decoder-dim", type=int, default=None, help="default 512; 3D: 384")
    ap.add_argument("--decoder-depth", type=int, default=None, help="default 8; 3D: 4")
    ap.add_argument("--decoder-heads", type=int, default=None, help="default 16; 3D: 12")
    ap.add_argument("--steps", type=int, default=30, help="interleaved timed rounds (one step per model each)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per model before timing")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="bf16 = torch.autocast bf16")
    ap.add_argument("--peers", default=None, help="comma list of medmae,lightly,monai (3D: medmae,monai)")
    ap.add_argument("--compile", action="store_true", help="also time every peer compiled (<peer>+compile)")
    ap.add_argument("--lr", type=float, default=None, help="default: 1.5e-4 * batch / 256 (MAE recipe)")
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument("--no-fused", dest="fused", action="store_false", help="default AdamW impl, not fused")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="for MFU on CUDA (H100 SXM bf16 dense)")
    ap.add_argument("--no-memory", dest="memory", action="store_false", help="skip the per-model memory runs")
    ap.add_argument("--memory-worker", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    a.dims = 3 if a.three_d else 2
    for key, (two, three) in DEFAULTS.items():
        if getattr(a, key) is None:
            setattr(a, key, three if a.three_d else two)
    if a.three_d and SIZES[a.model][0] % 6:
        ap.error(f"--3d: the {a.model} width {SIZES[a.model][0]} is not a multiple of 6 (3D sin-cos positions)")
    if a.lr is None:
        a.lr = 1.5e-4 * a.batch / 256
    if a.threads is None:
        a.threads = torch.get_num_threads()
    if a.img_size % a.patch_size:
        ap.error(f"--img-size {a.img_size} is not a multiple of --patch-size {a.patch_size}")
    if a.steps < 1 or a.warmup < 0:
        ap.error("--steps must be >= 1 and --warmup >= 0")
    if a.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but torch.cuda.is_available() is False")
    return a


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.memory_worker:
        memory_worker(a)
        return
    if a.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    wanted = [p.strip() for p in a.peers.split(",") if p.strip()]
    unknown = sorted(set(wanted) - set(PEERS))
    if unknown:
        sys.exit(f"unknown peers {unknown}; choose from {','.join(PEERS)}")
    if a.three_d and "lightly" in wanted:
        wanted.remove("lightly")
        print("skipped: lightly (lightly has no 3D MAE)")
    if a.compile:
        wanted += [name + COMPILED for name in wanted]

    print(f"machine: {machine_line(a)}")
    width, depth, heads = SIZES[a.model]
    print(
        f"config : ViT-{a.model[0].upper()}/{a.patch_size} ({width}w x {depth}d, {heads} heads), decoder "
        f"{a.decoder_dim}w x {a.decoder_depth}d x {a.decoder_heads}h, {a.img_size}^{a.dims} x {a.channels} ch, "
        f"batch {a.batch}, mask {MASK_RATIO}, {a.device} {a.precision}, AdamW(0.9, 0.95, wd {a.weight_decay}, "
        f"lr {a.lr:.3g}, fused={a.fused}), {a.warmup} warmup + {a.steps} interleaved rounds"
    )

    benches: list[Bench] = []
    for name in wanted:
        try:
            benches.append(build(name, a))
        except ImportError as e:
            print(f"skipped: {name} (could not import: {str(e).strip().splitlines()[0]})")
    if not benches:
        sys.exit("nothing to benchmark")

    imgs = make_input(a)
    steps = [make_step(b, a) for b in benches]
    load_start = loadavg()
    for _ in range(a.warmup):
        for step in steps:
            step(imgs)
    times: dict[str, list[float]] = {b.name: [] for b in benches}
    for r in range(a.steps):
        for b, step in zip(benches, steps, strict=True):
            times[b.name].append(step(imgs))
        if (r + 1) % max(1, a.steps // 5) == 0:
            print(f"  round {r + 1}/{a.steps}", flush=True)

    load_end = loadavg()
    mem: dict[str, float | None] = {}
    mem_how = ""
    if a.memory:
        for b in benches:
            mem[b.name], how = measure_memory(b.name, a)
            mem_how = how if how != "failed" else mem_how

    flops = train_flops_per_image(a)
    cuda = a.device == "cuda"
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    head = "| model | classes | params (M) | img/s median | img/s IQR | img/s min-max | ms/step | peak mem (MiB) |"
    head += " medmae img/s / this |"
    if cuda:
        head += " MFU |"
    print()
    print(head)
    print("|" + "---|" * head.count(" |"))
    for b in benches:
        ts = times[b.name]
        ips = [a.batch / t for t in ts]
        q1, med, q3 = quantiles(ips)
        trainable, unused = count_params(b, imgs, a)
        params = f"{trainable / 1e6:.2f}" + (f" ({unused:,} without grad)" if unused else "")
        m = mem.get(b.name)
        t_med = statistics.median(ts)
        # paired per-round speed-up of medmae (compiled alike) over this model: robust to slow drift
        ours = "medmae" + (COMPILED if b.name.endswith(COMPILED) else "")
        speedup = "-"
        if ours in times and b.name != ours:
            paired = [tp / tm for tp, tm in zip(ts, times[ours], strict=True)]
            speedup = f"{t_med / medians[ours]:.2f}x (paired {statistics.median(paired):.2f}x)"
        row = (
            f"| {b.name} | {b.classes} | {params} | {a.batch / t_med:.2f} | {q1:.2f}-{q3:.2f} | "
            f"{min(ips):.2f}-{max(ips):.2f} | {1e3 * t_med:.0f} | {'-' if m is None else f'{m:.0f}'} | {speedup} |"
        )
        if cuda:
            row += f" {100 * flops * a.batch / t_med / (a.peak_tflops * 1e12):.1f}% |"
        print(row)
    print()
    print(f"analytic training FLOPs: {flops / 1e9:.2f} GFLOP/image/step (matmuls, fwd+bwd = 3x fwd)")
    if cuda:
        print(f"MFU against --peak-tflops {a.peak_tflops:g}")
    print(f"1-min load average at start / end of the timed rounds: {load_start} / {load_end}")
    if mem_how:
        print(f"peak mem: each model trained alone for 3 steps in a fresh process; {mem_how}")
    for b in benches:
        base = b.name.removesuffix(COMPILED)
        ours = "medmae" + b.name[len(base) :]
        if base != "medmae" and ours in medians:
            print(f"{ours} / {b.name}: {medians[b.name] / medians[ours]:.2f}x images/s (ratio of medians)")
        if b.name.endswith(COMPILED) and base in medians:
            print(f"{b.name} / {base}: {medians[base] / medians[b.name]:.2f}x images/s (compiled vs eager)")
    if a.precision == "bf16" and not cuda:
        print("note: bf16 autocast on CPU is only fast with AMX / AVX512-BF16 kernels")


if __name__ == "__main__":
    main()
