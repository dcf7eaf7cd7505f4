"""Does 3D MAE pretraining help downstream? Few-label 3D brain-tissue segmentation, pretrained vs random init.

The 3D counterpart of ``benchmarks/transfer.py`` (docs/transfer.md, "3D segmentation"): the same real
data and labels, cut into cubes instead of axial slabs, and the product's 3D path end to end.

Data (real, offline): the MNI ICBM152 2009a symmetric T1 template (1 mm, 197 x 233 x 189, an average
of 152 real brain MRIs) and its grey- and white-matter probability maps, from the nilearn wheel
(``pip install -e ".[transfer]"``; only the data files are used). Labels: ``argmax(1-gm-wm, gm, wm)``
= background/CSF, grey matter, white matter (as the 2D benchmark).

Split (:func:`plan_boxes`): the 1 mm template is cut into disjoint cubes of ``--box`` voxels (the card's
``volume.size`` at ``--spacing-mm``; at the default 1 mm one box is one UNETR window), ``--gap`` voxels
apart on every axis, laid out to cover the brain. Roles go by *column*: every box sharing a (y, z)
position shares a role, because the template is exactly left-right symmetric and a box's mirror image
lies in its own column (a left test box and a right pretraining box would otherwise hold the same
voxels, mirrored). Columns are numbered y-major and column ``k`` is *test* when ``k % 4 == 1``,
*validation* when ``k % 4 == 3``, otherwise the training pool, from which ``--labelled`` boxes get labels
(the central-x boxes first, most brain first). Boxes with less than ``--min-brain`` labelled tissue are
not used. Pretraining sees every pool box without labels, so validation stands in for test when a
recipe is chosen (``--pretrain-sees-val true`` adds the validation boxes, as the first run did); test
voxels never enter it (tested by voxel hashes, mirrored ones included: tests/benchmarks/test_transfer3d.py).

Protocol (benchmarks/protocol.py): recipes are chosen on validation Dice, the default; the test boxes are
scored only with ``--final-test``, and every such run appends a line to ``benchmarks/results/test_looks.jsonl``
(benchmark ``transfer_seg3d_mni_tissue``).

The product path: NIfTI boxes -> ``data_prep.prep_archive`` -> cache -> ``CacheDataModule(volume=...)`` +
``MAEPretrainModule`` (``mae3d_vit_tiny_patch16``, Lightning) -> ``export_encoder`` (a ``medmae_vit3d`` card)
-> ``SegmentationDataModule`` + ``SegmentationModule`` in 3D mode (MONAI ``UNETR(spatial_dims=3)``, or with
``--decoder light`` the light decoder with a LayerNorm per tap; random 3D patches, sliding-window inference),
for ``medmae:DIR``, ``random:DIR`` and ``random-sincos:DIR`` (the same
network, preprocessing rebuilt from the same card, the same budget) -> Dice of grey and white matter on
whole boxes at the template's own 1 mm voxels (MONAI semantics, as ``val/dice``). Every seed is printed.

    pip install -e ".[transfer]"
    python benchmarks/transfer3d.py                   # the documented recipe, 3 seeds, validation only
    python benchmarks/transfer3d.py --final-test      # + test, once per chosen recipe (logged)
    python benchmarks/transfer3d.py --quick           # smoke run of the whole path (~1 min on one core)
"""

from __future__ import annotations

import hashlib
import logging
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import nibabel as nib
import numpy as np
import torch

from data_prep import prep_archive
from medmae.data import CacheDataModule, SamplingOptions
from medmae.data.volume import VolumeOptions
from medmae.export import export_encoder
from medmae.export.volume_preprocessing import VolumePreprocessor
from medmae.finetune.seg_data import SegmentationDataModule
from medmae.finetune.seg_data3d import PreparedVolume, prepare_volume_case
from medmae.finetune.segment import SegmentationModule, dice_per_class, mean_dice, predict_case
from medmae.train import MAEPretrainModule
from medmae.train.options import MAEOptions, OptimOptions

sys.path.insert(0, str(Path(__file__).resolve().parent))
from protocol import (  # noqa: E402
    NOT_SCORED,
    benchmark_parser,
    commit,
    compare,
    finish_run,
    recipe_values,
)
from protocol import recipe_record as protocol_recipe_record
from transfer import MNI, nilearn_data, quiet_trainer, write_csv  # noqa: E402  (the 2D benchmark's data)

#: the name this benchmark's looks at test carry in benchmarks/results/test_looks.jsonl
BENCHMARK = "transfer_seg3d_mni_tissue"

#: The pseudonymisation key of this benchmark's cache: it orders the cache's series (keyed hash), hence the
#: order in which pretraining samples them, so it is fixed for a reproducible encoder. Drawn once with
#: ``os.urandom`` for this benchmark; the data is a public template, there is no identity to protect.
BENCHMARK_SALT = "07fbfd400df73dc43b88ab719f043dae24abe46b8fcd799d870e4f8b9cc4b190"

ROLES = ("train", "val", "test")


@dataclass(frozen=True)
class Recipe:
    """Every setting of one 3D transfer comparison (defaults: the CPU recipe of docs/transfer.md, "3D")."""

    box: int = 48  # voxels per box edge = the card's volume.size (one UNETR window at the default 1 mm)
    spacing_mm: float = 1.0  # the card's spacing: the template's own, so Dice needs no resampling
    gap: int = 8  # voxels left out between neighbouring boxes on every axis
    min_brain: float = 0.1  # a box needs this fraction of grey + white matter to be used
    labelled: int = 3
    embed_dim: int = 96
    depth: int = 12  # UNETR 3D taps blocks 3, 6, 9: at least 10
    num_heads: int = 3
    mask_ratio: float = 0.75
    norm_pix_loss: bool = True
    crop_scale: tuple[float, float] = (0.4, 1.0)  # pretraining crop volume / field of view
    pretrain_steps: int = 3000
    pretrain_batch: int = 16
    blr: float = 2.4e-2  # lr = blr * 16 / 256 = 1.5e-3, the 2D benchmark's
    decoder_embed_dim: int = 96
    decoder_depth: int = 2
    finetune_steps: int = 160
    finetune_batch: int = 2
    lr: float = 1e-3
    layer_decay: float = 0.75
    warmup_steps: int = 16
    finetune_crop_scale: tuple[float, float] = (0.5, 1.0)  # patch volume fraction before resizing to the box
    foreground_prob: float = 0.5
    feature_size: int = 8  # UNETR's full-resolution width: 16 doubles the fine-tuning time on CPU
    sw_overlap: float = 0.25
    # unetr: MONAI UNETR 3D (the recipe of the first run); light: the 2D benchmark's decoder in 3D, with a
    # LayerNorm on each tapped block (tap_norm), over medmae's own encoder (docs/transfer.md, "3D")
    decoder: str = "unetr"
    tap_norm: bool = True
    # whether pretraining sees the validation boxes (unlabelled). False (since 2026-12-07): validation
    # stands in for test, whose boxes pretraining never sees; True: the first run's archive
    pretrain_sees_val: bool = False


#: Recipe fields that only shape pretraining: with ``--encoder`` they describe nothing that ran
PRETRAIN_FIELDS = (
    "embed_dim",
    "depth",
    "num_heads",
    "mask_ratio",
    "norm_pix_loss",
    "crop_scale",
    "pretrain_steps",
    "pretrain_batch",
    "blr",
    "decoder_embed_dim",
    "decoder_depth",
    "pretrain_sees_val",
)

#: --quick: every stage runs, at budgets that check the path, not the claim
QUICK: dict[str, Any] = dict(
    pretrain_steps=4,
    pretrain_batch=2,
    finetune_steps=4,
    finetune_batch=1,
    warmup_steps=1,
    embed_dim=48,
    depth=10,
    decoder_embed_dim=48,
    decoder_depth=1,
    feature_size=8,
    labelled=2,
)


# ---------------------------------------------------------------------------------------------- the split


@dataclass(frozen=True)
class Box:
    """One cube of the template: where it is (voxel start ``(x, y, z)``), its column and role."""

    index: int
    start: tuple[int, int, int]
    column: tuple[int, int]  # (y, z) box position: every box of a column shares the role
    role: str  # train / pool / val / test
    brain: float  # fraction of grey + white matter voxels


@dataclass
class Split:
    """The files one run reads: labelled boxes per role, the pretraining archive, and the plan."""

    cases: dict[str, list[tuple[Path, Path]]]
    archive: Path
    boxes: list[Box] = field(default_factory=list)

    def record(self) -> list[dict[str, Any]]:
        return [asdict(b) for b in self.boxes]


def axis_starts(n_voxels: int, lo: int, hi: int, box: int, gap: int) -> list[int]:
    """Starts of the fewest boxes of ``box`` voxels, ``gap`` apart, that cover ``[lo, hi]`` along an axis of
    ``n_voxels`` (as many as fit when fewer do), centred on that range and kept inside the axis."""
    fit = (n_voxels + gap) // (box + gap)
    if fit < 1:
        raise ValueError(f"a box of {box} voxels does not fit an axis of {n_voxels}")
    n = min(fit, -(-(hi - lo + 1 + gap) // (box + gap)))
    total = n * box + (n - 1) * gap
    start = min(max(int(round((lo + hi + 1 - total) / 2)), 0), n_voxels - total)
    return [start + i * (box + gap) for i in range(n)]


def box_edge(recipe: Recipe) -> int:
    """A box's edge in template voxels (1 mm): the card's field of view, ``box * spacing_mm`` mm."""
    return int(round(recipe.box * recipe.spacing_mm))


def plan_boxes(label: np.ndarray, recipe: Recipe) -> list[Box]:
    """The boxes of a labelled ``(x, y, z)`` volume and their roles (see the module docstring).

    Pure: the split depends on the labels' extent and the recipe's box, gap, min_brain and labelled, never
    on a seed, so every fine-tuning seed and every start is scored on the same boxes.
    """
    brain = label > 0
    ranges = []
    for axis in range(3):
        others = tuple(a for a in range(3) if a != axis)
        where = np.where(brain.any(axis=others))[0]
        if where.size == 0:
            raise ValueError("the label volume holds no brain")
        ranges.append(axis_starts(label.shape[axis], int(where.min()), int(where.max()), box_edge(recipe), recipe.gap))
    xs, ys, zs = ranges
    if len(ys) * len(zs) < 4:
        columns = len(ys) * len(zs)
        raise ValueError(f"boxes of {box_edge(recipe)} voxels give {columns} (y, z) columns; the split needs 4")
    roles = {1: "test", 3: "val"}
    b = box_edge(recipe)
    boxes: list[Box] = []
    for iy, y in enumerate(ys):
        for iz, z in enumerate(zs):
            role = roles.get((iy * len(zs) + iz) % 4, "pool")
            for x in xs:
                frac = float(brain[x : x + b, y : y + b, z : z + b].mean())
                if frac >= recipe.min_brain:
                    boxes.append(Box(len(boxes), (x, y, z), (iy, iz), role, round(frac, 4)))
    # labels for the central-x pool boxes first (their mirror images are themselves), most brain first
    middle = xs[len(xs) // 2]
    pool = sorted((bx for bx in boxes if bx.role == "pool"), key=lambda bx: (bx.start[0] != middle, -bx.brain))
    if len(pool) < recipe.labelled:
        raise ValueError(f"--labelled {recipe.labelled} but the training pool holds {len(pool)} boxes")
    chosen = {bx.index for bx in pool[: recipe.labelled]}
    out = [Box(bx.index, bx.start, bx.column, "train", bx.brain) if bx.index in chosen else bx for bx in boxes]
    if not all(any(bx.role == r for bx in out) for r in ("val", "test")):
        raise ValueError("the split left the validation or the test role without a box; lower --min-brain")
    return out


def write_boxes(work: Path, t1: np.ndarray, label: np.ndarray, affine: np.ndarray, recipe: Recipe) -> Split:
    """Box NIfTI files (image + label) per role under ``work/labelled``, and the image of every box outside
    the test and validation roles under ``work/unlabelled`` (the pretraining archive; validation boxes
    too with ``recipe.pretrain_sees_val``)."""
    boxes = plan_boxes(label, recipe)
    b = box_edge(recipe)
    cases: dict[str, list[tuple[Path, Path]]] = {r: [] for r in ROLES}
    (work / "labelled").mkdir(parents=True, exist_ok=True)
    archive = work / "unlabelled"
    archive.mkdir(parents=True, exist_ok=True)
    for bx in boxes:
        x, y, z = bx.start
        a = affine.copy()
        a[:3, 3] = affine[:3, :3] @ np.array([x, y, z], dtype=np.float64) + affine[:3, 3]
        image = np.ascontiguousarray(t1[x : x + b, y : y + b, z : z + b]).astype(np.int16)
        lab = np.ascontiguousarray(label[x : x + b, y : y + b, z : z + b]).astype(np.uint8)
        if bx.role != "test" and (bx.role != "val" or recipe.pretrain_sees_val):
            nib.save(nib.Nifti1Image(image, a), str(archive / f"box{bx.index:02d}.nii.gz"))
        if bx.role in cases:
            stem = work / "labelled" / f"{bx.role}_{bx.index:02d}"
            paths = (stem.with_name(stem.name + ".nii.gz"), stem.with_name(stem.name + "_label.nii.gz"))
            nib.save(nib.Nifti1Image(image, a), str(paths[0]))
            nib.save(nib.Nifti1Image(lab, a), str(paths[1]))
            cases[bx.role].append(paths)
    return Split(cases, archive, boxes)


def mni_volumes() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(t1, label, affine)`` of the nilearn MNI152 2009a template, labels as the 2D benchmark's."""
    data = nilearn_data()
    img = nib.load(str(data / MNI.format("t1")))
    gm = np.asarray(nib.load(str(data / MNI.format("gm"))).dataobj, dtype=np.float32) / 255.0
    wm = np.asarray(nib.load(str(data / MNI.format("wm"))).dataobj, dtype=np.float32) / 255.0
    label = np.argmax(np.stack([1 - gm - wm, gm, wm]), axis=0).astype(np.uint8)
    return np.asarray(img.dataobj).astype(np.int16), label, img.affine


def block_hashes(
    arrays: Iterable[np.ndarray], block: int = 8, mirror_axis: int | None = 0, min_fill: float = 0.5
) -> set[str]:
    """A hash of every ``block``-cube at every position of each array, and of its mirror image along
    ``mirror_axis`` (left-right: 0 for NIfTI ``(x, y, z)``, 2 for the cache's ``(Z, Y, X)``): two arrays share
    a hash only if they share voxels (or mirrored voxels), whatever their files are called. Cubes with
    less than ``min_fill`` non-zero voxels (the template's background) are left out: they could match by
    chance. The split's tests compare test boxes with the pretraining archive this way."""
    out: set[str] = set()
    for a in arrays:
        a = np.asarray(a)
        for arr in (a, np.flip(a, mirror_axis)) if mirror_axis is not None else (a,):
            win = np.lib.stride_tricks.sliding_window_view(arr, (block, block, block))
            rows = np.ascontiguousarray(win).reshape(-1, block**3)
            keep = np.count_nonzero(rows, axis=1) >= min_fill * block**3
            tag = f"{rows.dtype}".encode()
            out.update(hashlib.sha256(tag + r.tobytes()).hexdigest() for r in rows[keep])
    return out


def nifti_arrays(paths: Iterable[Path]) -> Iterable[np.ndarray]:
    """The arrays of NIfTI files as stored (``(x, y, z)``), one at a time."""
    for p in paths:
        yield np.asarray(nib.load(str(p)).dataobj)


# ---------------------------------------------------------------------------------------------- the path


def pretrain3d(work: Path, recipe: Recipe, archive: Path, seed: int = 0, salt_key: str = BENCHMARK_SALT) -> Path:
    """data_prep -> 3D MAE pretraining -> export: the product path (``medmae prep``, ``medmae fit`` with
    ``mae3d_*`` + ``data.volume``, ``medmae export``) on the unlabelled boxes; ``salt_key`` fixes the
    pseudonymisation key, and so the pretraining sample stream."""
    cache, salt = work / "cache", work / "salt"
    if not salt.exists():
        salt.write_text(salt_key + "\n", encoding="ascii")
        salt.chmod(0o600)
    prep_archive([archive], cache, workers=1, salt_file=salt, val_fraction=0.0, progress=False)
    pl.seed_everything(seed, verbose=False)
    size = (recipe.box,) * 3
    data = CacheDataModule(
        str(cache),
        batch_size=recipe.pretrain_batch,
        num_workers=0,
        seed=seed,
        sampling=SamplingOptions(samples_per_epoch=recipe.pretrain_batch * 50),
        volume=VolumeOptions(
            size=size,
            spacing_mm=recipe.spacing_mm,
            crop_scale=recipe.crop_scale,
            crop_aspect=(0.8, 1.25),
            flip_prob=(0.0, 0.0, 0.5),
            min_coverage=0.25,
            max_anisotropy=6.0,
        ),
    )
    module = MAEPretrainModule(
        variant="mae3d_vit_tiny_patch16",
        mae=MAEOptions(
            in_chans=1,
            img_size=size,
            patch_size=16,
            embed_dim=recipe.embed_dim,
            depth=recipe.depth,
            num_heads=recipe.num_heads,
            mask_ratio=recipe.mask_ratio,
            norm_pix_loss=recipe.norm_pix_loss,
            decoder_embed_dim=recipe.decoder_embed_dim,
            decoder_depth=recipe.decoder_depth,
            decoder_num_heads=3,
        ),
        optim=OptimOptions(blr=recipe.blr, warmup_steps=max(1, recipe.pretrain_steps // 10), min_lr=1e-5),
        seed=seed,
        log_images_every_n_steps=0,
    )
    trainer = quiet_trainer(work, recipe.pretrain_steps, limit_val_batches=0)
    trainer.fit(module, datamodule=data)
    export = work / "encoder3d"
    export_encoder(module.model, export, data.preprocessing(), {"global_step": trainer.global_step})
    return export


def score(net: torch.nn.Module, cases: Sequence[PreparedVolume], pre: VolumePreprocessor, recipe: Recipe) -> float:
    """Mean Dice of grey and white matter over whole boxes on their own voxels: ``val/dice``'s definition
    (per class the mean over the boxes whose truth holds it, then the mean over the two classes)."""
    rows = []
    for case in cases:
        pred, truth = predict_case(net, case, pre, batch=2, overlap=recipe.sw_overlap)
        rows.append(dice_per_class(pred, truth, 3))
    return mean_dice(rows)[1]


def finetune(
    work: Path,
    export: Path,
    init: str,
    seed: int,
    recipe: Recipe,
    cases_csv: Path,
    test: list[tuple[Path, Path]] | None,
) -> dict[str, float]:
    """Fine-tune one (init, seed) through ``SegmentationDataModule`` + ``SegmentationModule`` (3D mode: the
    card is a ``medmae_vit3d`` one) and return Dice on the validation boxes, and on the test boxes when
    given (``--final-test`` only)."""
    pl.seed_everything(seed, verbose=False)
    data = SegmentationDataModule(
        f"{init}:{export}",
        3,
        csv=str(cases_csv),
        batch_size=recipe.finetune_batch,
        seed=seed,
        samples_per_epoch=recipe.finetune_batch * recipe.finetune_steps,
        crop_scale=recipe.finetune_crop_scale,
        hflip_prob=0.0,
        foreground_prob=recipe.foreground_prob,
    )
    module = SegmentationModule(
        f"{init}:{export}",
        3,
        lr=recipe.lr,
        layer_decay=recipe.layer_decay,
        warmup_steps=recipe.warmup_steps,
        decoder=recipe.decoder,
        tap_norm=recipe.tap_norm,
        feature_size=recipe.feature_size,
        infer_batch=2,
        sw_overlap=recipe.sw_overlap,
    )
    trainer = quiet_trainer(work, recipe.finetune_steps, num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(module, datamodule=data)
    net = module.net.eval()
    pre = module.preprocessing
    assert isinstance(pre, VolumePreprocessor), "a 3D export must give a VolumePreprocessor"
    scores = {"val": score(net, data.val_cases, pre, recipe)}
    if test is not None:
        cases = [prepare_volume_case(str(i), str(lab), pre, 3, None, None) for i, lab in test]
        scores["test"] = score(net, cases, pre, recipe)
    return scores


def summarise(results: dict[str, list[dict[str, float]]], role: str) -> dict[str, Any]:
    """Pretrained against both baselines on ``role`` (val / test): :func:`protocol.compare`."""
    return compare({init: [r[role] for r in rows if role in r] for init, rows in results.items()})


def main(argv: list[str] | None = None) -> int:
    parser = benchmark_parser(__doc__, Recipe(), "tiny budgets and model: checks the path, not the claim")
    parser.set_defaults(seeds=[0, 1, 2])
    args = parser.parse_args(argv)
    values = recipe_values(args, Recipe())
    if args.quick:
        values.update(QUICK)
    recipe = Recipe(**values)
    torch.set_num_threads(args.threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    started, code = time.perf_counter(), commit()  # the code that runs: a look is logged against it
    with tempfile.TemporaryDirectory(prefix="medmae_transfer3d_") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        split = write_boxes(work, *mni_volumes(), recipe)
        counts = {r: len(split.cases[r]) for r in ROLES}
        pretraining_boxes = len(list(split.archive.glob("*.nii.gz")))
        print(
            f"boxes of {recipe.box}^3 at {recipe.spacing_mm} mm: labelled {counts['train']}, val {counts['val']}, "
            f"test {counts['test']}; pretraining archive {pretraining_boxes} boxes",
            flush=True,
        )
        t0 = time.perf_counter()
        export = args.encoder or pretrain3d(work, recipe, split.archive)
        pretrain_s = time.perf_counter() - t0
        print(f"pretraining: {pretrain_s:.0f} s", flush=True)
        cases_csv = write_csv(work / "cases.csv", split.cases)
        results: dict[str, list[dict[str, float]]] = {init: [] for init in args.inits}
        test = split.cases["test"] if args.final_test else None  # the protocol: test only with --final-test
        finetune_s: list[float] = []
        for seed in args.seeds:
            for init in args.inits:
                t1 = time.perf_counter()
                r = finetune(work, export, init, seed, recipe, cases_csv, test)
                finetune_s.append(time.perf_counter() - t1)
                results[init].append(r)
                shown = "  ".join(f"{k} Dice {v:.4f}" for k, v in r.items())
                print(f"seed {seed} {init:<13} {shown}  ({finetune_s[-1]:.0f} s)", flush=True)
    roles = ("val", "test") if args.final_test else ("val",)
    report = {
        "benchmark": BENCHMARK,
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}",
        "recipe": protocol_recipe_record(recipe, args.encoder, PRETRAIN_FIELDS),
        "seeds": args.seeds,
        "per_seed": results,
        **{role: summarise(results, role) for role in roles},
        "pretrain_seconds": round(pretrain_s, 1),
        "finetune_seconds_mean": round(statistics.mean(finetune_s), 1) if finetune_s else 0.0,
        "total_seconds": round(time.perf_counter() - started, 1),
        "labelled_boxes": counts["train"],
        "val_boxes": counts["val"],
        "test_boxes": counts["test"],
        "pretraining_boxes": pretraining_boxes,
        "boxes": split.record(),
    }
    print(
        f"\nmachine: {report['machine']}; pretraining {report['pretrain_seconds']} s, fine-tuning "
        f"{report['finetune_seconds_mean']} s per run, total {report['total_seconds']} s"
    )
    print(
        f"labelled boxes {counts['train']}; val {counts['val']}, test {counts['test']}"
        + ("" if args.final_test else NOT_SCORED)
    )
    finish_run(args, BENCHMARK, report["recipe"], report, results, "Dice", code)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
