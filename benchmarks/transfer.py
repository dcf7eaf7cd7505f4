"""Does MAE pretraining help downstream? Few-label brain-tissue segmentation, pretrained vs random init.

Data (real, offline): the MNI ICBM152 2009a T1 template (1 mm, an average of 152 real brain MRIs)
and its grey- and white-matter probability maps, which ship inside the nilearn wheel
(``pip install -e ".[transfer]"``; only the data files are used). Labels: ``argmax(1-gm-wm, gm, wm)``
= background/CSF, grey matter, white matter.

Split: the axial range holding brain is cut into slabs of ``--slab`` planes; slab ``i`` goes to
*test* when ``(i // B) % 4 == 1``, to *validation* when it is 3, otherwise to the training pool, from
which ``--labelled`` slabs (≤ 5, spread evenly) get labels. ``B = --split-block``: 1 (the default)
interleaves single slabs, the split the recipe was chosen on; 3 holds out contiguous 24-plane blocks,
whose anatomy lies apart from the labelled slabs. Pretraining sees every plane outside the test and
validation slabs, without labels, so validation stands in for test when a recipe is chosen
(``--pretrain-sees-val true`` adds the validation planes, as the benchmark did before 2026-12-07). An
``--encoder`` must come from a run with the same split and archive (another split's encoder has seen
its held-out planes).
``--extra-unlabelled DIR`` adds other people's scans (a folder of NIfTI files, e.g. written by
``benchmarks/extra_scans.py``: the Colin 27 brain, pydeface's mean head, pyradiomics' brain MRIs) to the
pretraining archive; they never enter fine-tuning or scoring.

Protocol (benchmarks/protocol.py): recipes are chosen on validation Dice, the default; the test slabs
are scored only with ``--final-test``, and every such run appends a line to
``benchmarks/results/test_looks.jsonl``. The current MNI test slabs were looked at while the recipe
was chosen (docs/transfer.md lists those looks).

Everything runs through the product's own path: NIfTI files -> ``data_prep.prep_archive`` -> cache ->
``CacheDataModule`` + ``MAEPretrainModule`` (Lightning) -> ``export_encoder`` -> ``SegmentationModule``
(``medmae:DIR`` vs ``random:DIR`` vs ``random-sincos:DIR``: the same network, the same preprocessing
from the card, the same budget; the last one has the pretrained sin-cos positions and random weights)
-> whole-volume Dice. Every seed is printed.

    pip install -e ".[transfer]"
    python benchmarks/transfer.py                     # the documented recipe, 5 seeds, validation only
    python benchmarks/transfer.py --final-test        # + test, once per chosen recipe (logged)
    python benchmarks/transfer.py --quick             # smoke run of the whole path (~1 min)
"""

from __future__ import annotations

import csv
import importlib.util
import logging
import platform
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import nibabel as nib
import numpy as np
import torch
from scipy import ndimage

from data_prep import prep_archive
from medmae.data import AugmentOptions, CacheDataModule, CropOptions, SamplingOptions, SelectionOptions
from medmae.export import export_encoder
from medmae.finetune.cases import Case
from medmae.finetune.seg_data import SegmentationDataModule, prepare_case
from medmae.finetune.segment import SegmentationModule, dice_per_class, mean_dice, predict_planes
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


def benchmark_name(task: str) -> str:
    """The name this benchmark's looks at test carry in benchmarks/results/test_looks.jsonl (one per task)."""
    return f"transfer_seg_mni_{task}"


#: ``--task``: what the labels mark, and how many classes (background included) each has
TASKS = {
    "tissue": 3,  # background/CSF, grey matter, white matter: mostly an intensity task
    "ventricles": 2,  # background, lateral ventricles: CSF like the CSF outside the brain, told apart by context
}
#: smallest 3D component of tissue-enclosed CSF kept as a lateral ventricle (voxels at 1 mm)
VENTRICLE_MIN_VOXELS = 5000

MNI = "mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"


@dataclass(frozen=True)
class Recipe:
    """Every setting of one transfer comparison (defaults: the CPU recipe of docs/transfer.md)."""

    img_size: int = 96
    embed_dim: int = 192
    depth: int = 12
    num_heads: int = 3
    slices: int = 1  # planes per sample (2.5D when > 1: adjacent planes as channels; fine-tuning follows the card)
    mask_ratio: float = 0.9  # with crop_scale (0.2, 1): chosen on validation (docs/transfer.md)
    norm_pix_loss: bool = True
    hog_weight: float = 0.0  # a HOG target beside the pixels (MaskFeat; model.mae.hog_weight); 0 = pixels only
    crop_scale: tuple[float, float] = (0.2, 1.0)
    # data.augment of pretraining (medmae.data.augment): chosen on validation against none and a
    # stronger setting (docs/transfer.md, "Augmenting pretraining"); --aug-rotate-deg 0 ... turns it off
    aug_rotate_deg: float = 15.0
    aug_scale: tuple[float, float] = (0.87, 1.15)
    aug_gamma: tuple[float, float] = (0.71, 1.4)
    aug_bias_field: float = 0.05
    pretrain_steps: int = 3000  # against 1500: chosen on validation (docs/transfer.md)
    pretrain_seed: int = 0  # seed of pretraining (init, masks, crops, augmentation): its spread is measured too
    # whether pretraining sees the validation planes (unlabelled). False: validation stands in for test,
    # whose planes pretraining never sees; True: the benchmark before 2026-12-07 (docs/transfer.md)
    pretrain_sees_val: bool = False
    # a folder of other people's scans (NIfTI) added to the pretraining archive, unlabelled; "" = the
    # template alone. benchmarks/extra_scans.py writes the real ones that install offline
    extra_unlabelled: str = ""
    pretrain_batch: int = 32
    blr: float = 1.2e-2  # lr = blr * 32 / 256 = 1.5e-3
    decoder_embed_dim: int = 128
    decoder_depth: int = 2
    slab: int = 8
    # slabs per role block: slab i's role follows (i // split_block) % 4 (1: the interleaved split the
    # recipe was chosen on; 3: contiguous 24-plane test blocks, anatomy apart from the labelled slabs)
    split_block: int = 1
    labelled: int = 3
    finetune_steps: int = 300
    finetune_batch: int = 8
    lr: float = 5e-4  # against 1e-3: chosen on validation by the ratio (docs/transfer.md, read its caveat)
    layer_decay: float = 0.6  # chosen on validation among 0.75 / 0.6 / 0.5 (docs/transfer.md)
    warmup_steps: int = 30
    encoder_hold: int = 0  # decoder-first steps (LP-FT): model.encoder_hold_steps
    finetune_crop_scale: tuple[float, float] = (0.5, 1.0)
    # data.augment of fine-tuning too (the aug_* distributions above; medmae.finetune data modules)
    finetune_augment: bool = False
    feature_size: int = 16
    decoder: str = "light"
    tap_norm: bool = True
    task: str = "tissue"  # TASKS: the labels to segment


def task_labels(task: str, gm: np.ndarray, wm: np.ndarray) -> np.ndarray:
    """The label volume of ``task`` from the template's grey/white-matter probability maps (x, y, z).

    ``ventricles``: CSF that tissue encloses within its axial plane (holes of the tissue mask), kept
    where it forms a 3D component of at least :data:`VENTRICLE_MIN_VOXELS` voxels: the two lateral
    ventricles. Their intensity is that of the CSF around the brain, so only context separates them.
    """
    tissue = np.argmax(np.stack([1 - gm - wm, gm, wm]), axis=0).astype(np.uint8)
    if task == "tissue":
        return tissue
    if task != "ventricles":
        raise ValueError(f"--task must be one of {sorted(TASKS)}, got {task!r}")
    solid = tissue > 0
    enclosed = np.zeros_like(solid)
    for z in range(solid.shape[2]):
        enclosed[:, :, z] = ndimage.binary_fill_holes(solid[:, :, z]) & ~solid[:, :, z]
    parts, n = ndimage.label(enclosed)
    sizes = ndimage.sum(enclosed, parts, range(1, n + 1))
    return np.isin(parts, 1 + np.flatnonzero(sizes >= VENTRICLE_MIN_VOXELS)).astype(np.uint8)


#: Recipe fields that only shape pretraining: with ``--encoder`` they describe nothing that ran
PRETRAIN_FIELDS = (
    "img_size",
    "embed_dim",
    "depth",
    "num_heads",
    "slices",
    "mask_ratio",
    "norm_pix_loss",
    "hog_weight",
    "extra_unlabelled",
    "crop_scale",
    "aug_rotate_deg",
    "aug_scale",
    "aug_gamma",
    "aug_bias_field",
    "pretrain_steps",
    "pretrain_seed",
    "pretrain_sees_val",
    "pretrain_batch",
    "blr",
    "decoder_embed_dim",
    "decoder_depth",
)


def recipe_record(recipe: Recipe, encoder: Path | None) -> dict[str, object]:
    """The recipe as run: with a given encoder its pretraining settings are that export's, not ours
    (``finetune_augment`` then names the distributions fine-tuning drew from, which stay ours)."""
    record = protocol_recipe_record(recipe, encoder, PRETRAIN_FIELDS)
    if recipe.finetune_augment:
        record["finetune_augment"] = {"on": True, **asdict(pretrain_augment(recipe))}
    if record.get("extra_unlabelled"):  # which files, not where they lay on the machine
        record["extra_unlabelled"] = sorted(p.name for p in extra_archive(recipe).glob("*.nii*"))
    return record


def extra_archive(recipe: Recipe) -> Path:
    """``--extra-unlabelled``: an existing folder of NIfTI scans (checked before anything runs)."""
    folder = Path(recipe.extra_unlabelled)
    if not folder.is_dir() or not any(folder.glob("*.nii*")):
        raise SystemExit(f"--extra-unlabelled {folder}: not a folder of NIfTI files (benchmarks/extra_scans.py)")
    return folder


def quiet_trainer(work: Path, max_steps: int, **kwargs: object) -> pl.Trainer:
    """A CPU Trainer without logger, checkpoints, bars or summary: the benchmark prints its own table."""
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=work,
        **kwargs,
    )


def nilearn_data() -> Path:
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(
            'benchmarks/transfer.py needs the MNI152 files shipped with nilearn: pip install -e ".[transfer]"'
        )
    return Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"


def slab_role(i: int, block: int) -> str:
    """Slab ``i``'s role: blocks of ``block`` slabs go pool, test, pool, validation, pool, test, ...

    ``block`` 1 interleaves single slabs (each test slab lies between two training-pool slabs); larger
    blocks keep test anatomy apart from the labelled slabs, as a held-out region of the brain.
    """
    if block < 1:
        raise ValueError(f"--split-block must be >= 1, got {block}")
    return ("pool", "test", "pool", "val")[(i // block) % 4]


def write_slabs(work: Path, recipe: Recipe) -> dict[str, list[tuple[Path, Path]]]:
    """Slab NIfTI files (image + label) per role, and the unlabelled runs outside the held-out slabs for pretraining."""
    data = nilearn_data()
    img = nib.load(str(data / MNI.format("t1")))
    t1 = np.asarray(img.dataobj).astype(np.int16)  # (x, y, z) RAS, axial planes along z
    gm = np.asarray(nib.load(str(data / MNI.format("gm"))).dataobj, dtype=np.float32) / 255.0
    wm = np.asarray(nib.load(str(data / MNI.format("wm"))).dataobj, dtype=np.float32) / 255.0
    label = task_labels(recipe.task, gm, wm)
    brain = task_labels("tissue", gm, wm) > 0
    zs = np.where(brain.any(axis=(0, 1)))[0]  # the brain's axial range: the same slabs for every task
    z0, n = int(zs.min()), (int(zs.max()) + 1 - int(zs.min())) // recipe.slab
    slabs = [(z0 + i * recipe.slab, z0 + (i + 1) * recipe.slab) for i in range(n)]
    roles = {role: [i for i in range(n) if slab_role(i, recipe.split_block) == role] for role in ("test", "val")}
    pool = [i for i in range(n) if slab_role(i, recipe.split_block) == "pool"]
    if recipe.task != "tissue":  # a structure task labels only pool slabs that hold the structure
        pool = [i for i in pool if label[:, :, slabs[i][0] : slabs[i][1]].any()]
    picks = [pool[p] for p in np.linspace(0, len(pool) - 1, 5).round().astype(int)]
    roles["train"] = [picks[k] for k in (2, 0, 4, 1, 3)][: recipe.labelled]  # nested: 1 = middle slab, ...

    def affine_at(z: int) -> np.ndarray:
        a = img.affine.copy()
        a[:3, 3] = img.affine[:3, :3] @ np.array([0, 0, z]) + img.affine[:3, 3]
        return a

    out: dict[str, list[tuple[Path, Path]]] = {}
    (work / "labelled").mkdir(parents=True, exist_ok=True)
    for role, idx in roles.items():
        out[role] = []
        for i in idx:
            a, b = slabs[i]
            image, lab = (
                work / "labelled" / f"{role}_{i:02d}.nii.gz",
                work / "labelled" / f"{role}_{i:02d}_label.nii.gz",
            )
            nib.save(nib.Nifti1Image(t1[:, :, a:b], affine_at(a)), str(image))
            nib.save(nib.Nifti1Image(label[:, :, a:b], affine_at(a)), str(lab))
            out[role].append((image, lab))
    # pretraining archive: every contiguous run of planes outside the held-out slabs, images only
    held = roles["test"] + ([] if recipe.pretrain_sees_val else roles["val"])
    held_planes = {z for i in held for z in range(*slabs[i])}
    archive = work / "unlabelled"
    archive.mkdir(exist_ok=True)
    keep = [z for z in range(t1.shape[2]) if z not in held_planes]
    runs: list[list[int]] = [[keep[0]]]
    for z in keep[1:]:
        (runs[-1].append(z) if z == runs[-1][-1] + 1 else runs.append([z]))
    for j, run in enumerate(runs):
        nib.save(
            nib.Nifti1Image(t1[:, :, run[0] : run[-1] + 1], affine_at(run[0])), str(archive / f"run{j:02d}.nii.gz")
        )
    return out


#: The pseudonymisation key of this benchmark's cache. The key orders the cache's series (by keyed
#: hash), hence the order in which pretraining samples them, so a fresh random key per run would give
#: a different encoder every time. This one was drawn at random (``os.urandom``) for the run whose
#: figures docs/transfer.md reports, and is fixed so that anyone rerunning the command gets the same
#: encoder. The data is a public template: there is no patient identity to protect here.
BENCHMARK_SALT = "f6219defa38f5e8a8096dc5f42ca6f1218430f3e3f5ad2174535f24ccfe0e7f4"


def pretrain_augment(recipe: Any) -> AugmentOptions:
    """``data.augment`` from a recipe's ``aug_*`` fields (a recipe without them: off)."""
    return AugmentOptions(
        rotate_deg=getattr(recipe, "aug_rotate_deg", 0.0),
        scale=getattr(recipe, "aug_scale", (1.0, 1.0)),
        gamma=getattr(recipe, "aug_gamma", (1.0, 1.0)),
        bias_field=getattr(recipe, "aug_bias_field", 0.0),
    )


def pretrain(
    work: Path, recipe: Any, seed: int = 0, archive: Sequence[Path] | None = None, salt_key: str = BENCHMARK_SALT
) -> Path:
    """data_prep -> MAE pretraining -> export: the product path on the unlabelled archive (default
    ``work/unlabelled``). ``recipe`` is any benchmark's recipe with these fields (``patch_size``: 16 if
    it has none); ``salt_key`` fixes the pseudonymisation key, and so the pretraining sample stream."""
    cache = work / "cache"
    salt = work / "salt"
    if not salt.exists():
        salt.write_text(salt_key + "\n", encoding="ascii")
        salt.chmod(0o600)
    archives = [work / "unlabelled"] if archive is None else list(archive)
    prep_archive(archives, cache, workers=1, salt_file=salt, val_fraction=0.0, progress=False)
    pl.seed_everything(seed, verbose=False)
    data = CacheDataModule(
        str(cache),
        img_size=recipe.img_size,
        slices=getattr(recipe, "slices", 1),
        batch_size=recipe.pretrain_batch,
        num_workers=0,
        seed=seed,
        crop=CropOptions(crop_scale=recipe.crop_scale, hflip_prob=0.5),
        sampling=SamplingOptions(samples_per_epoch=recipe.pretrain_batch * 50),
        selection=SelectionOptions(min_size=32),
        augment=pretrain_augment(recipe),
    )
    module = MAEPretrainModule(
        variant="mae_vit_tiny_patch16",
        mae=MAEOptions(
            in_chans=getattr(recipe, "slices", 1),
            img_size=recipe.img_size,
            patch_size=getattr(recipe, "patch_size", 16),
            embed_dim=recipe.embed_dim,
            depth=recipe.depth,
            num_heads=recipe.num_heads,
            mask_ratio=recipe.mask_ratio,
            norm_pix_loss=recipe.norm_pix_loss,
            hog_weight=getattr(recipe, "hog_weight", 0.0),
            decoder_embed_dim=recipe.decoder_embed_dim,
            decoder_depth=recipe.decoder_depth,
            decoder_num_heads=4,
        ),
        optim=OptimOptions(blr=recipe.blr, warmup_steps=recipe.pretrain_steps // 10, min_lr=1e-5),
        seed=seed,
        log_images_every_n_steps=0,
    )
    trainer = quiet_trainer(work, recipe.pretrain_steps, limit_val_batches=0)
    trainer.fit(module, datamodule=data)
    export = work / "encoder"
    export_encoder(module.model, export, data.preprocessing(), {"global_step": trainer.global_step})
    return export


def write_csv(path: Path, cases: dict[str, list[tuple[Path, Path]]]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "label", "patient", "split"])
        for role in ("train", "val"):
            for image, label in cases[role]:
                w.writerow([image, label, image.stem, role])
    return path


def finetune(
    work: Path,
    export: Path,
    init: str,
    seed: int,
    recipe: Recipe,
    cases_csv: Path,
    test: list[tuple[Path, Path]] | None,
) -> dict[str, float]:
    """Fine-tune one (init, seed); return mean foreground Dice on validation and on the test slabs.

    Dice is ``val/dice``'s (:func:`~medmae.finetune.segment.mean_dice`, MONAI semantics): per class the
    mean over the slabs whose truth holds it, then the mean over the foreground classes (tissue: grey and
    white matter, which every validation and test slab holds, docs/transfer.md "Score"; ventricles: the
    slabs without ventricles are left out, as MONAI's ``ignore_empty`` does).
    """
    classes = TASKS[recipe.task]
    pl.seed_everything(seed, verbose=False)
    data = SegmentationDataModule(
        f"{init}:{export}",
        classes,
        csv=str(cases_csv),
        batch_size=recipe.finetune_batch,
        seed=seed,
        samples_per_epoch=recipe.finetune_batch * recipe.finetune_steps,
        crop_scale=recipe.finetune_crop_scale,
        augment=pretrain_augment(recipe) if recipe.finetune_augment else AugmentOptions(),
    )
    module = SegmentationModule(
        f"{init}:{export}",
        classes,
        lr=recipe.lr,
        layer_decay=recipe.layer_decay,
        warmup_steps=recipe.warmup_steps,
        encoder_hold_steps=recipe.encoder_hold,
        feature_size=recipe.feature_size,
        decoder=recipe.decoder,
        tap_norm=recipe.tap_norm,
    )
    trainer = quiet_trainer(work, recipe.finetune_steps, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=data)
    net = module.net.eval()
    pre = module.preprocessing
    scores = {}
    roles = [("val", data.val_cases)] + ([("test", None)] if test is not None else [])
    for role, cases in roles:
        if cases is None:
            cases = [prepare_case(Case(0, str(i), str(lab), "", "test"), pre, classes, None, None) for i, lab in test]
        per_case = [
            dice_per_class(predict_planes(net, c.images, pre, c.plane_shape), c.label_stack, classes) for c in cases
        ]
        scores[role] = mean_dice(per_case)[1]
    return scores


def summarise(results: dict[str, list[dict[str, float]]], role: str) -> dict[str, Any]:
    """Pretrained against both baselines on ``role`` (val / test): :func:`protocol.compare`."""
    return compare({init: [r[role] for r in rows if role in r] for init, rows in results.items()})


def main(argv: list[str] | None = None) -> int:
    args = benchmark_parser(__doc__, Recipe(), "tiny budgets: checks the path, not the claim").parse_args(argv)
    values = recipe_values(args, Recipe())
    if args.quick:
        values.update(
            pretrain_steps=4,
            finetune_steps=4,
            pretrain_batch=8,
            finetune_batch=4,
            img_size=64,
            depth=10,
            embed_dim=96,
            warmup_steps=1,
        )
    recipe = Recipe(**values)
    if recipe.extra_unlabelled:
        extra_archive(recipe)  # a wrong folder stops here, not after the slabs are written
    torch.set_num_threads(args.threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    started, code = time.perf_counter(), commit()  # the code that runs: a look is logged against it
    with tempfile.TemporaryDirectory(prefix="medmae_transfer_") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        cases = write_slabs(work, recipe)
        t0 = time.perf_counter()
        archive = [work / "unlabelled"] + ([extra_archive(recipe)] if recipe.extra_unlabelled else [])
        export = args.encoder or pretrain(work, recipe, seed=recipe.pretrain_seed, archive=archive)
        pretrain_s = time.perf_counter() - t0
        cases_csv = write_csv(work / "cases.csv", cases)
        results: dict[str, list[dict[str, float]]] = {init: [] for init in args.inits}
        test = cases["test"] if args.final_test else None  # the protocol: test only with --final-test
        for seed in args.seeds:
            for init in args.inits:
                r = finetune(work, export, init, seed, recipe, cases_csv, test)
                results[init].append(r)
                shown = "  ".join(f"{k} Dice {v:.4f}" for k, v in r.items())
                print(f"seed {seed} {init:<13} {shown}", flush=True)
    roles = ("val", "test") if args.final_test else ("val",)
    report = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}",
        "recipe": recipe_record(recipe, args.encoder),
        "seeds": args.seeds,
        "per_seed": results,
        **{role: summarise(results, role) for role in roles},
        "pretrain_seconds": round(pretrain_s, 1),
        "total_seconds": round(time.perf_counter() - started, 1),
        "labelled_slabs": len(cases["train"]),
        "val_slabs": len(cases["val"]),
        "test_slabs": len(cases["test"]),
    }
    print(
        f"\nmachine: {report['machine']}; pretraining {report['pretrain_seconds']} s, total {report['total_seconds']} s"
    )
    print(
        f"labelled slabs {report['labelled_slabs']} x {recipe.slab} planes; "
        f"val {report['val_slabs']}, test {report['test_slabs']}" + ("" if args.final_test else NOT_SCORED)
    )
    finish_run(args, benchmark_name(recipe.task), report["recipe"], report, results, "Dice", code)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
