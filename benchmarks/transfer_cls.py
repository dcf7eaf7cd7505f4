"""Does MAE pretraining help a few-label classification? A focal brain lesion, pretrained vs random init.

No installable package ships 50 or more labelled real scans, so the task is built from a real scan
with a documented, seeded finding (docs/transfer.md, "Classification: a focal finding").

Anatomy (real MRI): the MNI ICBM152 2009a T1 template (1 mm, an average of 152 real brain MRIs; in
the nilearn wheel, ``pip install -e ".[transfer]"``) and its white-matter probability map (where a
lesion may be centred). :func:`make_patient` accepts any 3D volume, so the generator is tested
without nilearn.

One *patient* is one NIfTI series of ``Task.planes`` axial planes ``Task.gap_mm`` apart (int16,
``Task.fov_mm`` at 1 mm), resampled from the template (trilinear) with its own

* axial position: the centre plane uniform over the template levels whose white matter covers at
  least ``Task.z_area`` of its largest axial area;
* pose and size: in-plane rotation within +-``yaw_deg``, a tilt about the left-right axis within
  +-``pitch_deg``, isotropic scale in ``scale``, in-plane shift within +-``shift_mm``;
* scanner: a smooth multiplicative bias field (``exp`` of a random polynomial of degree 2 in-plane
  plus a linear through-plane term, coefficients N(0, ``bias_sd``)), a gain (log-uniform in ``gain``),
  an offset (uniform in ``offset``, in template units) and Rician noise (sigma uniform in ``noise``
  times the template's 99th percentile, i.e. 2-5 % of the white-matter signal).

The finding, in exactly the positive patients (half of every cohort: even indices): one
T1-hyperintense white-matter lesion (the look of an enhancing lesion on a post-contrast T1, e.g. a
small metastasis or an active MS plaque, or of a subacute haemorrhage), an ellipsoid with in-plane
diameters uniform in ``lesion_mm`` (5-15 mm), through-plane semi-axis uniform in ``lesion_z_mm`` (so
every plane of the series cuts it), random in-plane orientation, centred on the series' middle level
at a point of the resampled white-matter mask at least ``depth_mm`` from its edge. Inside, the anatomy
is multiplied by ``1 + contrast`` (``contrast`` uniform in ``contrast``: 15-35 % brighter;
``hyperintense=False`` makes it as much darker), with a smooth-step edge ``edge_mm`` wide; the lesion
goes in before the bias field and the noise, as in a scan. White matter is the template's brightest
tissue, and the lesion exceeds it by as much as the bias field moves it (25 % peak to peak over the
brain for the median patient, 13-41 % for 80 % of them), so "a bright spot" is not a trivial cue.

Every patient is a pure function of ``(seed, role, index)``: its nuisance draws, lesion draws and
noise come from separate child streams of ``numpy.random.SeedSequence([seed, role, index])``, so a
positive patient and the same patient without the lesion differ only inside the lesion.

Cohorts: ``train`` (``--labelled`` patients with labels), ``val`` (``Task.val_patients``), ``test``
(``Task.test_patients``, held out) and ``unlabelled`` (``--unlabelled`` patients, half with a lesion,
no labels). Pretraining reads the unlabelled patients and the training patients' images (not their
labels); never a validation or test patient, so validation is a faithful stand-in for test.

Protocol (benchmarks/protocol.py): recipes are chosen on validation AUROC, the default; the test
patients are scored only with ``--final-test``, and every such run appends a line to
``benchmarks/results/test_looks.jsonl`` (benchmark ``transfer_cls_mni_focal_lesion``).

The product path: NIfTI -> ``data_prep.prep_archive`` -> cache -> ``CacheDataModule`` +
``MAEPretrainModule`` (Lightning) -> ``export_encoder`` -> ``ClassificationDataModule`` +
``ClassificationModule`` for ``medmae:DIR``, ``random:DIR`` and ``random-sincos:DIR`` (the same
network, preprocessing from the same card, the same budget) -> series AUROC (torchmetrics
``BinaryAUROC`` of the series probabilities, exactly ``val/auroc``). Every seed is printed.

    pip install -e ".[transfer]"
    python benchmarks/transfer_cls.py                      # the documented recipe, 5 seeds, validation only
    python benchmarks/transfer_cls.py --final-test         # + test, once per chosen recipe (logged)
    python benchmarks/transfer_cls.py --quick              # smoke run of the whole path (~1-2 min)
    python benchmarks/transfer_cls.py --work W --encoder W/encoder --lr 1e-3   # reuse an export
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import logging
import math
import platform
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parent))
from protocol import NOT_SCORED, benchmark_parser, commit, compare, finish_run, recipe_values  # noqa: E402
from protocol import recipe_record as protocol_recipe_record

#: the name this benchmark's looks at test carry in benchmarks/results/test_looks.jsonl
BENCHMARK = "transfer_cls_mni_focal_lesion"

#: child streams of a patient's SeedSequence: nuisance (pose, scanner), lesion, noise
ROLES = {"unlabelled": 0, "train": 1, "val": 2, "test": 3}


# ---------------------------------------------------------------------------------------------- the data


@dataclass(frozen=True)
class Task:
    """The generator: every setting of the patients and the cohort sizes that are not recipe."""

    planes: int = 3
    gap_mm: float = 2.0
    fov_mm: tuple[int, int] = (160, 192)  # (left-right, anterior-posterior) at 1 mm
    z_area: float = 0.3
    yaw_deg: float = 10.0
    pitch_deg: float = 5.0
    scale: tuple[float, float] = (0.9, 1.1)
    shift_mm: float = 6.0
    bias_sd: float = 0.08
    gain: tuple[float, float] = (2.0, 6.0)
    offset: tuple[float, float] = (0.0, 30.0)
    noise: tuple[float, float] = (0.02, 0.05)
    lesion_mm: tuple[float, float] = (5.0, 15.0)
    lesion_z_mm: tuple[float, float] = (3.0, 7.5)
    contrast: tuple[float, float] = (0.15, 0.35)
    hyperintense: bool = True
    edge_mm: float = 2.0
    depth_mm: float = 3.0
    val_patients: int = 48
    test_patients: int = 48
    seed: int = 0


@dataclass(frozen=True)
class Anatomy:
    """A 3D scan ``(X, Y, Z)`` with its voxel spacing in mm and where a lesion may be centred."""

    volume: np.ndarray
    spacing: tuple[float, float, float]
    tissue: np.ndarray  # bool, same shape: lesion centres go here

    @classmethod
    def of(
        cls,
        volume: np.ndarray,
        spacing: Sequence[float],
        tissue: np.ndarray | None = None,
        reference: float | None = None,
    ) -> Anatomy:
        """Any 3D volume; without ``tissue`` the brightest 30 % of the foreground (the white matter of a T1).

        ``reference``: rescale the volume so that its 99th percentile is this value (the MNI template's
        is about 225; the int16 series then stay far from overflow); ``None`` keeps it as it is.
        """
        v = np.asarray(volume, dtype=np.float32)
        if v.ndim != 3:
            raise ValueError(f"the anatomy must be a 3D volume, got shape {v.shape}")
        if reference is not None:
            v = v * np.float32(reference / np.percentile(v, 99))
        if tissue is None:
            fg = v[v > 0.1 * np.percentile(v, 99)]
            tissue = v > np.percentile(fg, 70)
        return cls(v, (float(spacing[0]), float(spacing[1]), float(spacing[2])), np.asarray(tissue, dtype=bool))

    @property
    def reference(self) -> float:
        """The bright-tissue level noise is scaled to (99th percentile of the volume)."""
        return float(np.percentile(self.volume, 99))


def mni_anatomy() -> Anatomy:
    """The nilearn MNI152 2009a T1 template; lesion centres in white matter (probability > 0.5)."""
    from transfer import MNI, nilearn_data  # the same files benchmarks/transfer.py reads

    data = nilearn_data()
    t1 = nib.load(str(data / MNI.format("t1")))
    wm = np.asarray(nib.load(str(data / MNI.format("wm"))).dataobj, dtype=np.float32) / 255.0
    return Anatomy.of(np.asarray(t1.dataobj), t1.header.get_zooms()[:3], wm > 0.5)


@dataclass(frozen=True)
class Patient:
    """One generated series and what made it (``info``: every draw, for the record)."""

    role: str
    index: int
    label: int
    array: np.ndarray  # (X, Y, planes) int16
    affine: np.ndarray
    info: dict[str, Any]
    lesion_mask: np.ndarray  # (X, Y, planes) bool: where the lesion changed the anatomy (empty if negative)


def _rotation(yaw: float, pitch: float) -> np.ndarray:
    cz, sz, cx, sx = math.cos(yaw), math.sin(yaw), math.cos(pitch), math.sin(pitch)
    rz = np.array([[cz, -sz, 0.0], [sz, cz, 0.0], [0.0, 0.0, 1.0]])
    rx = np.array([[1.0, 0.0, 0.0], [0.0, cx, -sx], [0.0, sx, cx]])
    return rz @ rx


def _levels(anatomy: Anatomy, task: Task) -> tuple[float, float]:
    """The axial range (mm) a series centre may take: levels with enough lesion-eligible tissue."""
    area = anatomy.tissue.sum(axis=(0, 1))
    if area.max() == 0:
        raise ValueError("the anatomy's tissue mask is empty: nowhere to place a lesion")
    zs = np.where(area >= task.z_area * area.max())[0]
    return float(zs.min() * anatomy.spacing[2]), float(zs.max() * anatomy.spacing[2])


def _centre_xy(anatomy: Anatomy) -> tuple[float, float]:
    fg = anatomy.volume > 0.1 * anatomy.reference
    xs, ys = np.where(fg.any(axis=2))
    return (
        (xs.min() + xs.max()) / 2 * anatomy.spacing[0],
        (ys.min() + ys.max()) / 2 * anatomy.spacing[1],
    )


def make_patient(anatomy: Anatomy, task: Task, role: str, index: int, lesion: bool | None = None) -> Patient:
    """Patient ``index`` of ``role`` (deterministic in ``task.seed``); ``lesion`` overrides the label's
    lesion (the same patient with or without it; only the tests use that)."""
    label = int(index % 2 == 0)
    with_lesion = bool(label) if lesion is None else bool(lesion)
    seq = np.random.SeedSequence([task.seed, ROLES[role], index])
    nuisance, lesion_rng, noise_rng = (np.random.default_rng(s) for s in seq.spawn(3))

    # ---- pose, size, position (nuisance stream)
    z_lo, z_hi = _levels(anatomy, task)
    z_c = nuisance.uniform(z_lo, z_hi)
    yaw = math.radians(nuisance.uniform(-task.yaw_deg, task.yaw_deg))
    pitch = math.radians(nuisance.uniform(-task.pitch_deg, task.pitch_deg))
    scale = nuisance.uniform(*task.scale)
    shift = nuisance.uniform(-task.shift_mm, task.shift_mm, size=2)
    gain = math.exp(nuisance.uniform(math.log(task.gain[0]), math.log(task.gain[1])))
    offset = nuisance.uniform(*task.offset)
    sigma = nuisance.uniform(*task.noise) * anatomy.reference
    bias_coef = nuisance.normal(0.0, task.bias_sd, size=6)  # u, v, u^2, uv, v^2, w

    nx, ny = task.fov_mm
    u = np.arange(nx) - (nx - 1) / 2.0
    v = np.arange(ny) - (ny - 1) / 2.0
    w = (np.arange(task.planes) - (task.planes - 1) / 2.0) * task.gap_mm
    centre = np.array([*_centre_xy(anatomy), z_c]) + np.array([shift[0], shift[1], 0.0])
    rot = _rotation(yaw, pitch)
    spacing = np.asarray(anatomy.spacing)

    def sample(field: np.ndarray, ww: np.ndarray) -> np.ndarray:
        uu, vv, wz = np.meshgrid(u, v, ww, indexing="ij")
        pts = rot @ np.stack([uu.ravel(), vv.ravel(), wz.ravel()]) / scale + centre[:, None]
        out = ndimage.map_coordinates(field, pts / spacing[:, None], order=1, cval=0.0, mode="constant")
        return out.reshape(uu.shape)

    image = sample(anatomy.volume, w)  # (X, Y, planes), template units

    # ---- the lesion (lesion stream; drawn for every patient, applied to positives)
    mid = sample(anatomy.tissue.astype(np.float32), np.zeros(1))[:, :, 0] > 0.5
    depth = ndimage.distance_transform_edt(mid)  # 1 mm pixels
    where = np.argwhere(depth >= task.depth_mm)
    if len(where) == 0:
        where = np.argwhere(depth >= max(1.0, depth.max() / 2))
    if len(where) == 0:
        raise ValueError(f"{role} patient {index}: no lesion-eligible tissue in the field of view")
    cx, cy = where[lesion_rng.integers(len(where))]
    axes = lesion_rng.uniform(*task.lesion_mm, size=2) / 2.0
    az = lesion_rng.uniform(*task.lesion_z_mm)
    phi = lesion_rng.uniform(0.0, math.pi)
    contrast = lesion_rng.uniform(*task.contrast)
    dx = (np.arange(nx) - cx)[:, None, None]
    dy = (np.arange(ny) - cy)[None, :, None]
    dz = w[None, None, :]
    p1 = dx * math.cos(phi) + dy * math.sin(phi)
    p2 = -dx * math.sin(phi) + dy * math.cos(phi)
    rho = np.sqrt((p1 / axes[0]) ** 2 + (p2 / axes[1]) ** 2 + (dz / az) ** 2)
    signed = (rho - 1.0) * float(np.cbrt(axes[0] * axes[1] * az))  # ~ mm outside (+) / inside (-) the surface
    t = np.clip(0.5 - signed / task.edge_mm, 0.0, 1.0)
    profile = t * t * (3.0 - 2.0 * t)  # smooth step: 1 inside, 0 beyond edge_mm / 2 outside
    lesion_mask = (profile > 0) & with_lesion
    if with_lesion:
        image = image * (1.0 + (1.0 if task.hyperintense else -1.0) * contrast * profile)

    # ---- scanner: bias field, gain, offset, Rician noise (noise stream)
    un = (u / (nx / 2.0))[:, None, None]
    vn = (v / (ny / 2.0))[None, :, None]
    wn = (w / 20.0)[None, None, :]
    c = bias_coef
    bias = np.exp(c[0] * un + c[1] * vn + c[2] * (un**2 - 1 / 3) + c[3] * un * vn + c[4] * (vn**2 - 1 / 3) + c[5] * wn)
    signal = gain * (bias * image + offset)
    n1, n2 = noise_rng.standard_normal((2, *signal.shape))
    magnitude = np.sqrt((signal + gain * sigma * n1) ** 2 + (gain * sigma * n2) ** 2)
    array = np.clip(np.rint(magnitude), 0, np.iinfo(np.int16).max).astype(np.int16)

    affine = np.diag([1.0, 1.0, task.gap_mm, 1.0])
    affine[:3, 3] = [-(nx - 1) / 2.0, -(ny - 1) / 2.0, -(task.planes - 1) / 2.0 * task.gap_mm]
    info = {
        "role": role,
        "index": index,
        "label": label,
        "lesion": with_lesion,
        "z_mm": round(z_c, 2),
        "yaw_deg": round(math.degrees(yaw), 2),
        "pitch_deg": round(math.degrees(pitch), 2),
        "scale": round(scale, 4),
        "shift_mm": [round(float(s), 2) for s in shift],
        "gain": round(gain, 4),
        "offset": round(offset, 2),
        "noise_sigma": round(sigma, 3),
        "bias_coefficients": [round(float(x), 4) for x in bias_coef],
        "lesion_centre_px": [int(cx), int(cy)],
        "lesion_diameters_mm": [round(2 * float(axes[0]), 2), round(2 * float(axes[1]), 2), round(2 * az, 2)],
        "lesion_contrast": round(contrast, 4),
    }
    return Patient(role, index, label, array, affine, info, lesion_mask)


@dataclass(frozen=True)
class Cohort:
    """The written series: ``(path, label)`` per labelled role, paths of the pretraining archive."""

    train: list[tuple[Path, int]]
    val: list[tuple[Path, int]]
    test: list[tuple[Path, int]]
    unlabelled: list[Path]
    archive: list[Path]  # the folders pretraining reads: unlabelled patients + the training patients' images


def cohort_sizes(task: Task, labelled: int, unlabelled: int) -> dict[str, int]:
    return {"train": labelled, "val": task.val_patients, "test": task.test_patients, "unlabelled": unlabelled}


def write_cohort(work: Path, anatomy: Anatomy, task: Task, labelled: int, unlabelled: int) -> Cohort:
    """Write every patient as ``work/series/<role>/<role>_NNN.nii.gz`` and their draws to ``patients.json``."""
    roles: dict[str, list[Any]] = {}
    record = []
    for role, n in cohort_sizes(task, labelled, unlabelled).items():
        folder = work / "series" / role
        folder.mkdir(parents=True, exist_ok=True)
        roles[role] = []
        for i in range(n):
            p = make_patient(anatomy, task, role, i)
            path = folder / f"{role}_{i:03d}.nii.gz"
            nib.save(nib.Nifti1Image(p.array, p.affine), str(path))
            roles[role].append(path if role == "unlabelled" else (path, p.label))
            record.append(p.info)
    (work / "patients.json").write_text(json.dumps(record, indent=1))
    archive = [work / "series" / "unlabelled", work / "series" / "train"]
    return Cohort(roles["train"], roles["val"], roles["test"], roles["unlabelled"], archive)


def plane_hashes(paths: Sequence[Path]) -> list[str]:
    """A hash of every axial plane of NIfTI series (values as float64, with the plane's shape)."""
    out = []
    for path in paths:
        array = np.asarray(nib.load(str(path)).dataobj, dtype=np.float64)
        for k in range(array.shape[2]):
            plane = np.ascontiguousarray(array[:, :, k])
            out.append(hashlib.sha256(repr(plane.shape).encode() + plane.tobytes()).hexdigest())
    return out


# ---------------------------------------------------------------------------------------------- the recipe


@dataclass(frozen=True)
class Recipe:
    """Every setting of one comparison (defaults: the CPU recipe of docs/transfer.md)."""

    img_size: int = 96
    patch_size: int = 16
    embed_dim: int = 192
    depth: int = 12
    num_heads: int = 3
    mask_ratio: float = 0.9  # the segmentation benchmark's choice (docs/transfer.md), fixed before this search
    norm_pix_loss: bool = True
    crop_scale: tuple[float, float] = (0.2, 1.0)
    # data.augment of pretraining (rotation, zoom, bias field, gamma; medmae.data.augment): off by default
    aug_rotate_deg: float = 0.0
    aug_scale: tuple[float, float] = (1.0, 1.0)
    aug_gamma: tuple[float, float] = (1.0, 1.0)
    aug_bias_field: float = 0.0
    pretrain_steps: int = 3000
    pretrain_batch: int = 32
    blr: float = 1.2e-2  # lr = blr * 32 / 256 = 1.5e-3
    decoder_embed_dim: int = 128
    decoder_depth: int = 2
    unlabelled: int = 240
    labelled: int = 48
    level: str = "slice"
    finetune_steps: int = 200
    finetune_batch: int = 16
    lr: float = 5e-4
    layer_decay: float = 0.65  # MAE's fine-tuning value for ViT-B
    weight_decay: float = 0.05
    drop_path: float = 0.1
    warmup_steps: int = 20
    encoder_hold: int = 0  # head-first steps (LP-FT): model.encoder_hold_steps
    global_pool: str = "avg"  # avg (the MAE recipe) | max | avgmax (a focal finding is not averaged away)
    finetune_crop_scale: tuple[float, float] = (0.7, 1.0)
    hflip: float = 0.5


#: Recipe fields that only shape pretraining: with ``--encoder`` they describe nothing that ran
PRETRAIN_FIELDS = (
    "img_size",
    "patch_size",
    "embed_dim",
    "depth",
    "num_heads",
    "mask_ratio",
    "norm_pix_loss",
    "crop_scale",
    "aug_rotate_deg",
    "aug_scale",
    "aug_gamma",
    "aug_bias_field",
    "pretrain_steps",
    "pretrain_batch",
    "blr",
    "decoder_embed_dim",
    "decoder_depth",
    "unlabelled",
)

QUICK = dict(
    pretrain_steps=4,
    finetune_steps=4,
    pretrain_batch=8,
    finetune_batch=4,
    img_size=64,
    depth=4,
    embed_dim=96,
    warmup_steps=1,
    unlabelled=8,
    labelled=8,
)
QUICK_TASK = dict(val_patients=6, test_patients=6)


def recipe_record(recipe: Recipe, encoder: Path | None) -> dict[str, object]:
    """The recipe as run: with a given encoder its pretraining settings are that export's, not ours."""
    return protocol_recipe_record(recipe, encoder, PRETRAIN_FIELDS)


#: The pseudonymisation key of this benchmark's cache (it orders the cache's series, hence the order
#: pretraining samples them; fixed so that a rerun gives the same encoder). Drawn with ``os.urandom``;
#: the data is generated from a public template: no identity to protect.
BENCHMARK_SALT = "41b986d0158a50f2a3445ac721999f3159aa906af116fa0997f0eb568bb98a5d"


def pretrain(work: Path, recipe: Recipe, archive: Sequence[Path], seed: int = 0) -> Path:
    """data_prep -> MAE pretraining -> export on the unlabelled archive: benchmarks/transfer.py's own
    stage, with this benchmark's archive, patch size and pseudonymisation key."""
    from transfer import pretrain as pretrain_archive

    return pretrain_archive(work, recipe, seed, archive=archive, salt_key=BENCHMARK_SALT)


def write_csv(path: Path, cohort: Cohort) -> Path:
    """The label CSV of fine-tuning: training and validation patients (never test), split fixed."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "label", "patient", "split"])
        for role in ("train", "val"):
            for image, label in getattr(cohort, role):
                w.writerow([image, label, image.name.split(".")[0], role])
    return path


def series_auroc(module: Any, series: Sequence[Any]) -> float:
    """``val/auroc``'s number for prepared series: BinaryAUROC of the module's series probabilities."""
    import torch
    from torchmetrics.classification import BinaryAUROC

    module.eval()
    with torch.no_grad():
        probs = torch.stack([module.series_probabilities(s.images)[0] for s in series])
    target = torch.stack([s.target[0] for s in series]).long()
    return float(BinaryAUROC()(probs, target))


def finetune(
    work: Path, export: Path, init: str, seed: int, recipe: Recipe, cases_csv: Path, test: list[tuple[Path, int]] | None
) -> dict[str, float]:
    """Fine-tune one (init, seed); series AUROC on validation (and on the test patients when given)."""
    import lightning.pytorch as pl
    from transfer import quiet_trainer

    from medmae.finetune.cases import Case
    from medmae.finetune.classify import ClassificationModule
    from medmae.finetune.cls_data import ClassificationDataModule, prepare_series

    pl.seed_everything(seed, verbose=False)
    start = f"{init}:{export}"
    data = ClassificationDataModule(
        start,
        str(cases_csv),
        task="binary",
        level=recipe.level,
        batch_size=recipe.finetune_batch,
        samples_per_epoch=recipe.finetune_batch * recipe.finetune_steps,
        planes_per_series=None,
        hflip_prob=recipe.hflip,
        crop_scale=recipe.finetune_crop_scale,
        seed=seed,
    )
    module = ClassificationModule(
        start,
        task="binary",
        level=recipe.level,
        lr=recipe.lr,
        layer_decay=recipe.layer_decay,
        weight_decay=recipe.weight_decay,
        warmup_steps=recipe.warmup_steps,
        encoder_hold_steps=recipe.encoder_hold,
        global_pool=recipe.global_pool,
        drop_path_rate=recipe.drop_path,
    )
    trainer = quiet_trainer(work, recipe.finetune_steps, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=data)
    scores = {"val": series_auroc(module, data.val_series)}
    logged = trainer.callback_metrics.get("val/auroc")
    if logged is not None and abs(float(logged) - scores["val"]) > 1e-6:
        raise RuntimeError(f"series AUROC {scores['val']} differs from the logged val/auroc {float(logged)}")
    if test is not None:
        pre, csv_path = data.preprocessing, Path(cases_csv)
        cases = [Case(k + 2, str(p), (float(y),), p.name, "test") for k, (p, y) in enumerate(test)]
        scores["test"] = series_auroc(module, [prepare_series(c, pre, csv_path, None, None, None) for c in cases])
    return scores


# ---------------------------------------------------------------------------------------------- the run


def main(argv: list[str] | None = None) -> int:
    quick_help = "tiny budgets and cohorts: checks the path, not the claim"
    args = benchmark_parser(__doc__, Recipe(), quick_help).parse_args(argv)
    values = recipe_values(args, Recipe())
    task = Task()
    if args.quick:
        values.update(QUICK)
        task = dataclasses.replace(task, **QUICK_TASK)
    recipe = Recipe(**values)

    import torch

    torch.set_num_threads(args.threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    started, code = time.perf_counter(), commit()  # the code that runs: a look is logged against it
    with tempfile.TemporaryDirectory(prefix="medmae_transfer_cls_") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        cohort = write_cohort(work, mni_anatomy(), task, recipe.labelled, 0 if args.encoder else recipe.unlabelled)
        t0 = time.perf_counter()
        export = args.encoder or pretrain(work, recipe, cohort.archive)
        pretrain_s = time.perf_counter() - t0
        cases_csv = write_csv(work / "cases.csv", cohort)
        results: dict[str, list[dict[str, float]]] = {init: [] for init in args.inits}
        test = cohort.test if args.final_test else None  # the protocol: test only with --final-test
        for seed in args.seeds:
            for init in args.inits:
                r = finetune(work, export, init, seed, recipe, cases_csv, test)
                results[init].append(r)
                shown = "  ".join(f"{k} AUROC {v:.4f}" for k, v in r.items())
                print(f"seed {seed} {init:<13} {shown}", flush=True)
    roles = ("val", "test") if args.final_test else ("val",)
    report = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}",
        "recipe": recipe_record(recipe, args.encoder),
        "task": asdict(task),
        "seeds": args.seeds,
        "per_seed": results,
        **{role: compare({i: [r[role] for r in rows] for i, rows in results.items()}) for role in roles},
        "pretrain_seconds": round(pretrain_s, 1),
        "total_seconds": round(time.perf_counter() - started, 1),
        "labelled_patients": len(cohort.train),
        "val_patients": len(cohort.val),
        "test_patients": len(cohort.test),
        "pretraining_patients": None if args.encoder else len(cohort.unlabelled) + len(cohort.train),
    }
    print(
        f"\nmachine: {report['machine']}; pretraining {report['pretrain_seconds']} s, total {report['total_seconds']} s"
    )
    print(
        f"patients: {report['labelled_patients']} labelled, {report['val_patients']} validation, "
        f"{report['test_patients']} test" + ("" if args.final_test else NOT_SCORED)
    )
    look = {**report["recipe"], "task": report["task"]}
    finish_run(args, BENCHMARK, look, report, results, "AUROC", code)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
