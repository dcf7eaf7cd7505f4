"""3D training-loader throughput at 96³: medmae's cache vs MONAI ``LoadImage`` + ``Spacing`` + ``RandSpatialCrop``.

Builds (once, under ``--work``) a synthetic CT archive of ``--volumes`` NIfTI files written with
nibabel -- ``--size``² x ``--slices`` int16 voxels in HU at ``--spacing`` mm (default 512² x 200 at
0.7 x 0.7 x 1.25 mm: a body, two lungs and a spine with noise, the slices of
``benchmarks/dataloader.py``), uncompressed ``.nii`` with a dcm2niix-style affine -- and its cache with
``data_prep.prep_archive(nifti_modality="CT", val_fraction=0)`` (the ``medmae prep`` path; every
volume in the training split). Then measures samples/s of full batches of ``--crop``³ crops at
``--out-spacing`` mm for:

* ``monai``: ``monai.data.Dataset`` over the NIfTI files with ``Compose([LoadImaged, EnsureChannelFirstd,
  Orientationd("RAS"), Spacingd(pixdim=1.5, mode="bilinear"), ScaleIntensityRanged(-160, 240 -> 0, 1,
  clip=True), RandSpatialCropd(96, random_size=False)])`` and ``monai.data.DataLoader`` (MONAI's
  straightforward 3D pretraining loader: each sample reads and resamples its whole volume).
* ``medmae``: ``CacheDataModule(cache, volume=VolumeOptions(size=96, spacing_mm=1.5, crop_scale=(0.5,
  1.5)), intensity=IntensityOptions(ct_windows=[(40, 400)]))`` -- the same fixed soft-tissue window
  (level 40, width 400 = -160..240 HU) -- whose samples read only the box of stored voxels a crop
  needs from the memory-mapped cache and resample it to 1.5 mm. When the datamodule cannot be built
  (``--medmae-path dataset``, or an error in it, which is printed), the same samples come from
  ``CacheVolumeDataset`` + ``EpochWeightedSampler`` in a plain ``torch.utils.data.DataLoader``; the
  output says which path ran.

Both give float32 ``(B, 1, 96, 96, 96)`` batches in [0, 1]. Differences by design: medmae's crops vary
in scale (0.5-1.5 of the field of view) and aspect and may flip left-right; MONAI's are fixed-size
crops of the whole volume resampled to 1.5 mm. Per worker setting, each loader runs ``--warmup``
batches (worker start-up) and then its timed batches, ``--repeats`` times; the table shows medians.
The process uses one torch thread, so ``workers=0`` is one core; DataLoader workers use one torch
thread each. "per CPU-s" divides the samples by the CPU seconds of the loading processes (what one
unshared core delivers), which is robust to other jobs on the machine; the load average is printed.

Example (the docs/benchmarks.md figures)::

    python benchmarks/loader3d.py --work /tmp/medmae_bench3d
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dataloader import machine, phantom, time_loader  # noqa: E402  (the same slices and timing)

CT_WINDOW = (40.0, 400.0)  # level, width in HU: -160..240, MONAI's ScaleIntensityRanged below


# ----------------------------------------------------------------------------- synthetic archive


def write_nifti_archive(
    root: Path, n_volumes: int, n_slices: int, size: int, spacing: tuple[float, float, float]
) -> list[Path]:
    """Write ``n_volumes`` CT volumes as NIfTI (skipped when present); returns their paths."""
    import nibabel as nib

    files = [root / f"ct{v:03d}.nii" for v in range(n_volumes)]
    root.mkdir(parents=True, exist_ok=True)
    # dcm2niix's affine for axial slices: DICOM LPS -> NIfTI RAS flips x and y
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    for v, path in enumerate(files):
        if path.is_file():
            continue
        rng = np.random.default_rng(v)
        vol = np.empty((size, size, n_slices), np.int16)  # NIfTI (i, j, k) = (x, y, z)
        for z in range(n_slices):
            vol[:, :, z] = phantom(z, n_slices, size, rng).T
        img = nib.Nifti1Image(vol, affine)
        img.header.set_xyzt_units("mm")
        img.header.set_slope_inter(1.0, 0.0)
        tmp = path.with_suffix(".tmp.nii")
        nib.save(img, tmp)
        tmp.rename(path)
    return files


def build_cache3d(archive: Path, cache: Path, salt: Path) -> str:
    """The cache through ``data_prep`` (the real ``medmae prep`` path); returns how it was built."""
    from data_prep import prep_archive

    if (cache / "manifest.json").is_file():
        return "existing cache"
    summary = prep_archive(
        [archive], cache, workers=1, salt_file=salt, progress=False, nifti_modality="CT", val_fraction=0.0
    )
    return f"data_prep.prep_archive ({summary.series_built} series, nifti_modality CT, val_fraction 0)"


# ----------------------------------------------------------------------------- the two loaders


def monai_loader(files: list[Path], a: argparse.Namespace, workers: int, n_samples: int) -> DataLoader:
    from monai.data import DataLoader as MonaiDataLoader
    from monai.data import Dataset as MonaiDataset
    from monai.transforms import (
        Compose,
        EnsureChannelFirstd,
        LoadImaged,
        Orientationd,
        RandSpatialCropd,
        ScaleIntensityRanged,
        Spacingd,
    )

    lo, hi = CT_WINDOW[0] - CT_WINDOW[1] / 2, CT_WINDOW[0] + CT_WINDOW[1] / 2
    transform = Compose(
        [
            LoadImaged(keys="image", image_only=True),
            EnsureChannelFirstd(keys="image"),
            Orientationd(keys="image", axcodes="RAS"),
            Spacingd(keys="image", pixdim=a.out_spacing, mode="bilinear"),
            ScaleIntensityRanged(keys="image", a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True),
            RandSpatialCropd(keys="image", roi_size=a.crop, random_size=False),
        ]
    )
    transform.set_random_state(seed=0)
    dataset = MonaiDataset([{"image": str(f)} for f in files], transform=transform)
    sampler = torch.utils.data.RandomSampler(dataset, replacement=True, num_samples=n_samples)
    return MonaiDataLoader(dataset, batch_size=a.batch, sampler=sampler, num_workers=workers, drop_last=True)


def volume_options(a: argparse.Namespace):  # noqa: ANN201  (medmae is imported lazily)
    from medmae.data.volume import VolumeOptions

    return VolumeOptions(size=a.crop, spacing_mm=a.out_spacing, crop_scale=(0.5, 1.5))


def medmae_datamodule(cache: Path, a: argparse.Namespace, workers: int, n_samples: int) -> DataLoader:
    from medmae.data import CacheDataModule, IntensityOptions, LoaderOptions, SamplingOptions

    dm = CacheDataModule(
        str(cache),
        volume=volume_options(a),
        intensity=IntensityOptions(ct_windows=(CT_WINDOW,)),
        batch_size=a.batch,
        num_workers=workers,
        sampling=SamplingOptions(samples_per_epoch=n_samples),
        loader=LoaderOptions(persistent_workers=False),
    )
    dm.setup("fit")
    return dm.train_dataloader()


def medmae_dataset(cache: Path, a: argparse.Namespace, workers: int, n_samples: int) -> DataLoader:
    from medmae.data.cache import load_manifest
    from medmae.data.intensity import IntensityRule
    from medmae.data.sampler import EpochWeightedSampler
    from medmae.data.volume import VolumeIndex, VolumeTransform, select_volumes
    from medmae.data.volume_dataset import CacheVolumeDataset

    opts = volume_options(a)
    rows = select_volumes(load_manifest(cache).rows, split="train", options=opts).rows
    index = VolumeIndex(rows, opts)
    dataset = CacheVolumeDataset(cache, index, VolumeTransform(opts, IntensityRule.checked(ct_windows=[CT_WINDOW])))
    sampler = EpochWeightedSampler(index, n_samples, seed=0, num_replicas=1, rank=0)
    return DataLoader(dataset, batch_size=a.batch, sampler=sampler, num_workers=workers, drop_last=True)


def check_batch(loader: DataLoader, a: argparse.Namespace) -> str:
    """One batch: shape, dtype and range (both loaders must give the same kind of tensor)."""
    image = torch.as_tensor(next(iter(loader))["image"])
    expected = (a.batch, 1, a.crop, a.crop, a.crop)
    if tuple(image.shape) != expected or image.dtype != torch.float32 or not torch.isfinite(image).all():
        raise RuntimeError(f"unexpected batch {tuple(image.shape)} {image.dtype}, expected {expected} float32")
    return f"{tuple(image.shape)} {str(image.dtype).removeprefix('torch.')}, range {image.min():.2f}-{image.max():.2f}"


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/medmae_bench3d"), help="archive + cache folder")
    ap.add_argument("--volumes", type=int, default=8)
    ap.add_argument("--size", type=int, default=512, help="in-plane voxels of each volume")
    ap.add_argument("--slices", type=int, default=200, help="slices of each volume")
    ap.add_argument("--spacing", type=float, nargs=3, default=(0.7, 0.7, 1.25), help="x y z voxel spacing, mm")
    ap.add_argument("--crop", type=int, default=96, help="output side in voxels")
    ap.add_argument("--out-spacing", type=float, default=1.5, help="output spacing, mm (isotropic)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--batches", type=int, default=20, help="timed batches per run (medmae)")
    ap.add_argument("--baseline-batches", type=int, default=3, help="timed batches per run (MONAI)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    ap.add_argument("--medmae-path", choices=("auto", "datamodule", "dataset"), default="auto")
    ap.add_argument("--no-baseline", action="store_true")
    a = ap.parse_args(argv)
    if min(a.volumes, a.size, a.slices, a.crop, a.batch, a.batches, a.baseline_batches, a.repeats) < 1:
        ap.error("sizes, counts and --repeats must be >= 1")
    resampled = [n * s / a.out_spacing for n, s in zip((a.size, a.size, a.slices), a.spacing, strict=True)]
    if min(resampled) < a.crop:  # MONAI's RandSpatialCrop does not pad: its crops would be smaller
        ap.error(f"volumes at --out-spacing {a.out_spacing} mm are {[round(r) for r in resampled]} voxels, < --crop")
    return a


def pick_medmae(cache: Path, a: argparse.Namespace) -> tuple[str, object]:
    """The medmae loader factory: the datamodule when it builds and yields a batch, else the dataset."""
    if a.medmae_path != "dataset":
        try:
            check_batch(medmae_datamodule(cache, a, 0, a.batch * 2), a)
            return "CacheDataModule(volume=VolumeOptions(...))", medmae_datamodule
        except Exception as e:  # noqa: BLE001  (reported, then the dataset path runs)
            if a.medmae_path == "datamodule":
                raise
            print(f"CacheDataModule(volume=...) failed, using the dataset path: {type(e).__name__}: {e}")
    return "CacheVolumeDataset + EpochWeightedSampler + DataLoader", medmae_dataset


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    torch.set_num_threads(1)
    print(f"machine: {machine()}, nibabel {metadata.version('nibabel')}; torch threads 1 (each worker: 1)")
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    archive, cache = a.work / "archive3d", a.work / "cache3d"
    t0 = time.perf_counter()
    files = write_nifti_archive(archive, a.volumes, a.slices, a.size, tuple(a.spacing))
    how = build_cache3d(archive, cache, a.work / "bench3d.salt")
    mib = sum(f.stat().st_size for f in files) / 2**20
    sx, sy, sz = a.spacing
    print(
        f"archive: {a.volumes} NIfTI volumes of {a.size}x{a.size}x{a.slices} int16 HU at {sx:g}x{sy:g}x{sz:g} mm "
        f"(uncompressed, {mib:.0f} MiB)"
    )
    print(f"cache built by: {how} ({time.perf_counter() - t0:.1f} s incl. archive)")
    name, make_medmae = pick_medmae(cache, a)
    print(f"medmae path: {name}")
    print(
        f"output {a.crop}^3 at {a.out_spacing:g} mm, batch {a.batch}, CT window {CT_WINDOW[0]:g}/{CT_WINDOW[1]:g}, "
        f"{a.warmup} warm-up + {a.batches} (medmae) / {a.baseline_batches} (MONAI) timed batches, "
        f"median of {a.repeats} runs"
    )
    n_samples = a.batch * (a.warmup + max(a.batches, a.baseline_batches) + 2)
    pipelines = [("medmae", lambda w: make_medmae(cache, a, w, n_samples), a.batches)]
    if not a.no_baseline:
        pipelines.insert(0, ("monai", lambda w: monai_loader(files, a, w, n_samples), a.baseline_batches))
        print(f"batch check: monai {check_batch(monai_loader(files, a, 0, n_samples), a)}")
    print(f"batch check: medmae {check_batch(make_medmae(cache, a, 0, n_samples), a)}\n")

    results: dict[tuple[str, int], tuple[float, float]] = {}
    for workers in a.workers:
        for label, make, batches in pipelines:
            runs = [time_loader(make(workers), a.warmup, batches) for _ in range(a.repeats)]
            results[(label, workers)] = (statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs))
            print(f"  {label:6s} workers={workers}: " + ", ".join(f"{w:.2f}/s ({c:.2f} per CPU-s)" for w, c in runs))
            sys.stdout.flush()

    print(f"\nload average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}\n")
    print("samples/s of the loader (wall) and per CPU-second of the loading processes; speed-up = medmae / MONAI\n")
    print(
        "| input | workers | MONAI samples/s | medmae samples/s | speed-up | MONAI per CPU-s | medmae per CPU-s "
        "| speed-up (CPU) |"
    )
    print("|" + "---|" * 8)
    for workers in a.workers:
        ours = results[("medmae", workers)]
        base = results.get(("monai", workers))
        cells = [f"3D {a.crop}^3", str(workers), f"{base[0]:.2f}" if base else "-", f"{ours[0]:.2f}"]
        cells += [f"{ours[0] / base[0]:.1f}x" if base else "-", f"{base[1]:.2f}" if base else "-", f"{ours[1]:.2f}"]
        cells += [f"{ours[1] / base[1]:.1f}x" if base else "-"]
        print("| " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
