"""Training-loader throughput: ``CacheDataModule`` vs the naive MONAI pipeline straight from DICOM.

Builds (once, under ``--work``) a synthetic CT archive with pydicom -- ``--series`` series of
``--slices`` 512² int16 slices with RescaleIntercept -1024 (a body, lungs and a spine, with noise) --
and its cache with ``data_prep.prep_archive`` (or, when data_prep cannot be imported or fails, by
writing the same HU arrays through ``medmae.data.cache``; the output says which). Then measures
samples/s of full batches at 224² for:

* ``baseline``: a map-style dataset over the DICOM files: MONAI ``LoadImage(PydicomReader)`` ->
  ``ScaleIntensityRange`` (the soft-tissue window) -> ``RandSpatialCrop(random_size=True)`` (area
  ~0.2-1 of the slice) -> ``Resize(224)``; for 2.5D it loads and stacks k adjacent files.
* ``medmae``: ``CacheDataModule`` with its defaults (random-resized crop 0.2-1.0, bicubic antialiased
  resize, random CT window, flip) and ``samples_per_epoch`` large enough for the run.

Each configuration runs ``--warmup`` batches (worker start-up, page cache) and then ``--batches``
timed batches, ``--repeats`` times; the table shows the median. The process uses one torch thread,
so ``workers=0`` is one core; "per worker core" divides by ``max(workers, 1)``. The machine is
shared by whatever else runs: the load average is printed before and after.

Example (the docs/data.md table)::

    python benchmarks/dataloader.py --work /tmp/medmae_bench

Worker memory against the number of series (issue 20; no throughput run)::

    python benchmarks/dataloader.py --memory-series 10000 100000 --work /tmp/medmae_mem
    python benchmarks/dataloader.py --memory-series 10000 --memory-tree /path/to/other/checkout

builds synthetic caches of S tiny series (``archive_scale.synthetic_cache``), runs the training
loader ``CacheDataModule`` makes (2 workers, fork) in a fresh process per S and reads every worker's
``/proc/<pid>/smaps_rollup`` after the first batch and after ``--memory-batches`` more: RSS, PSS and
USS (private pages: what the worker costs on its own). ``--memory-tree`` imports medmae from another
checkout, for a before/after comparison on the same caches.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cpu_model, smaps_mib, usable_cores  # noqa: E402

HU_INTERCEPT = -1024


# ----------------------------------------------------------------------------- synthetic archive


def phantom(z: int, n_slices: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """One axial CT slice in HU: air, an elliptic body, two lungs and a spine, plus noise."""
    yy, xx = np.indices((size, size), dtype=np.float32) / size - 0.5
    t = z / max(n_slices - 1, 1)
    hu = np.full((size, size), -1000.0, np.float32)
    body = (xx / (0.42 - 0.05 * t)) ** 2 + (yy / 0.32) ** 2 < 1
    hu[body] = 40.0
    for side in (-1, 1):
        lung = ((xx - side * 0.17) / (0.12 + 0.04 * t)) ** 2 + ((yy + 0.02) / 0.2) ** 2 < 1
        hu[lung] = -850.0
    hu[(xx**2 + (yy - 0.2) ** 2) < 0.04**2] = 700.0
    hu += rng.normal(0.0, 20.0, hu.shape).astype(np.float32)
    return np.clip(hu, -1024, 3000).astype(np.int16)


def write_archive(root: Path, n_series: int, n_slices: int, size: int) -> list[list[Path]]:
    """Write the DICOM archive (skipped when complete); returns each series' files in slice order."""
    import pydicom  # noqa: F401  (imported for the error message when missing)
    from pydicom.dataset import Dataset as DicomDataset
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    files = [[root / f"series{s}" / f"slice{z:04d}.dcm" for z in range(n_slices)] for s in range(n_series)]
    if all(f.is_file() for fs in files for f in fs):
        return files
    for s, series_files in enumerate(files):
        series_files[0].parent.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(s)
        study, series, frame = generate_uid(), generate_uid(), generate_uid()
        for z, path in enumerate(series_files):
            uid = generate_uid()
            meta = FileMetaDataset()
            meta.MediaStorageSOPClassUID = CTImageStorage
            meta.MediaStorageSOPInstanceUID = uid
            meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds = DicomDataset()
            ds.file_meta = meta
            ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, uid
            ds.Modality, ds.PatientName, ds.PatientID = "CT", f"Bench^Patient{s}", f"BENCH{s:03d}"
            ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
            ds.StudyDate, ds.SeriesNumber, ds.InstanceNumber = "20240101", 1, z + 1
            ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
            ds.ImagePositionPatient = [-179.2, -179.2, float(z)]
            ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
            ds.PixelSpacing, ds.SliceThickness = [0.7, 0.7], 1.0
            ds.Rows = ds.Columns = size
            ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
            ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
            ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = HU_INTERCEPT, 1, "HU"
            ds.PixelData = (phantom(z, len(series_files), size, rng) - HU_INTERCEPT).astype(np.int16).tobytes()
            ds.save_as(path, enforce_file_format=True)
    return files


def build_cache(archive: Path, cache: Path) -> str:
    """Build the cache with ``data_prep`` (the real path); returns how it was built."""
    from data_prep import prep_archive

    if (cache / "manifest.json").is_file():
        return "existing cache"
    # every series in train: with a fresh random salt a few series could otherwise all land in val
    summary = prep_archive(
        [archive], cache, workers=2, salt_file=cache.parent / "bench.salt", progress=False, val_fraction=0.0
    )
    return f"data_prep.prep_archive ({summary.series_built} series, val_fraction 0)"


# ----------------------------------------------------------------------------- baseline


class NaiveDicomDataset(Dataset):
    """The straightforward MONAI way: decode the DICOM file(s) of every sample, then transform."""

    def __init__(self, files: list[list[Path]], slices: int, size: int) -> None:
        from monai.transforms import Compose, LoadImage, RandSpatialCrop, Resize, ScaleIntensityRange

        self.items = []
        for series_files in files:
            n = len(series_files)
            for z in range(n):
                idx = np.clip(np.arange(slices) + z - (slices - 1) // 2, 0, n - 1)
                self.items.append([str(series_files[i]) for i in idx])
        self.load = LoadImage(reader="PydicomReader", image_only=True, ensure_channel_first=True)
        side = int(512 * 0.2**0.5)
        self.transform = Compose(
            [
                ScaleIntensityRange(-160, 240, 0.0, 1.0, clip=True),
                RandSpatialCrop((side, side), max_roi_size=(512, 512), random_size=True),
                Resize((size, size)),
            ]
        )

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        image = torch.cat([torch.as_tensor(self.load(p)) for p in self.items[i]], dim=0)
        return {"image": torch.as_tensor(self.transform(image))}


# ----------------------------------------------------------------------------- timing


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds used so far by these processes (Linux /proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / tick
    return total


def time_loader(loader: DataLoader, warmup: int, batches: int) -> tuple[float, float]:
    """``(samples per wall second, samples per CPU second of the loading processes)``.

    The loading processes are the workers, or the main process with ``num_workers=0``. The CPU figure
    is what one worker core delivers when it is not shared, whatever else runs on the machine.
    """
    it = iter(loader)
    for _ in range(warmup):
        next(it)
    workers = getattr(it, "_workers", [])
    pids = [w.pid for w in workers] if workers else [os.getpid()]
    n = 0
    cpu_start, start = cpu_seconds(pids), time.perf_counter()
    for _ in range(batches):
        n += len(next(it)["image"])
    elapsed, cpu = time.perf_counter() - start, cpu_seconds(pids) - cpu_start
    del it
    return n / elapsed, n / max(cpu, 1.0 / os.sysconf("SC_CLK_TCK"))  # at least one clock tick


def medmae_loader(cache: Path, slices: int, workers: int, batch: int, size: int, n_samples: int) -> DataLoader:
    from medmae.data import CacheDataModule, SamplingOptions

    dm = CacheDataModule(
        str(cache),
        img_size=size,
        slices=slices,
        batch_size=batch,
        num_workers=workers,
        sampling=SamplingOptions(samples_per_epoch=n_samples),
    )
    dm.setup("fit")
    return dm.train_dataloader()


def baseline_loader(
    files: list[list[Path]], slices: int, workers: int, batch: int, size: int, n_samples: int
) -> DataLoader:
    dataset = NaiveDicomDataset(files, slices, size)
    sampler = RandomSampler(dataset, replacement=True, num_samples=n_samples)
    return DataLoader(dataset, batch_size=batch, sampler=sampler, num_workers=workers, drop_last=True)


# ----------------------------------------------------------------------------- worker memory against series


def memory_loader(cache: Path, batches: int) -> DataLoader:
    """The training loader ``CacheDataModule.setup("fit")`` + ``train_dataloader()`` builds, wired by hand
    (defaults, min_size 8, 32² output, batch 16, 2 workers), so the same code measures any checkout
    whatever its datamodule's options look like. The manifest rows are local: freed on return, as in
    the datamodule."""
    from medmae.data.cache import CacheEntryError, check_series_array, load_manifest
    from medmae.data.dataset import CacheSliceDataset
    from medmae.data.index import SliceIndex, select_series
    from medmae.data.sampler import EpochWeightedSampler
    from medmae.data.transforms import SliceTransform

    selection = select_series(load_manifest(cache).rows, split="train", min_size=8)
    kept = []
    for row in selection.rows:  # CacheDataModule's verify_entries
        try:
            check_series_array(cache, row)
        except CacheEntryError:
            continue
        kept.append(row)
    index = SliceIndex(kept, "axial", 0.5)
    dataset = CacheSliceDataset(cache, index, SliceTransform((32, 32)), seed=0)
    sampler = EpochWeightedSampler(index, 16 * (batches + 8), seed=0, num_replicas=1, rank=0, batch_size=16)
    return DataLoader(dataset, batch_size=16, sampler=sampler, num_workers=2, drop_last=True)


def memory_child(cache: Path, batches: int) -> dict[str, object]:
    """One loader run on ``cache`` in this process; memory of the main process and of each worker."""
    import gc

    t = time.perf_counter()
    loader = memory_loader(cache, batches)
    setup_s = time.perf_counter() - t
    gc.collect()
    main_after_setup = smaps_mib(os.getpid())
    it = iter(loader)
    next(it)
    pids = [w.pid for w in it._workers]  # noqa: SLF001 - the loader's own worker handles
    first = [smaps_mib(p) for p in pids]
    t = time.perf_counter()
    for _ in range(batches):
        next(it)
    steady_s = time.perf_counter() - t
    steady = [smaps_mib(p) for p in pids]
    out = {"setup_s": setup_s, "batches_s": steady_s, "main": main_after_setup, "first": first, "steady": steady,
           "train_series": loader.dataset.index.num_series}
    del it
    return out


def memory_main(args: argparse.Namespace) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from archive_scale import synthetic_cache

    tree = (args.memory_tree or Path(__file__).resolve().parents[1]).resolve()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tree), os.environ.get("PYTHONPATH", "")])}
    print(machine())
    print(f"medmae imported from {tree}; 2 workers (fork), batch 16 of 32², first batch then "
          f"{args.memory_batches} batches; MiB per worker (mean of 2)\n")
    print("| series S | train series | main RSS / USS after setup | worker RSS | worker PSS | worker USS "
          "| worker USS after first batch | batches s |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for s in args.memory_series:
        cache = args.work / f"series-cache-{s}"
        if not (cache / "manifest.json").is_file():
            cache.mkdir(parents=True, exist_ok=True)
            synthetic_cache(cache, s)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-child", str(cache),
               "--memory-batches", str(args.memory_batches)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tree, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"memory run at S={s} failed:\n{proc.stderr[-3000:]}")
        r = json.loads(proc.stdout.strip().splitlines()[-1])

        def mean(which: str, key: str, r: dict = r) -> float:
            return statistics.mean(w[key] for w in r[which])

        print(f"| {s:,} | {r['train_series']:,} | {r['main']['rss']:,.0f} / {r['main']['uss']:,.0f} "
              f"| {mean('steady', 'rss'):,.0f} | {mean('steady', 'pss'):,.0f} | {mean('steady', 'uss'):,.1f} "
              f"| {mean('first', 'uss'):,.1f} | {r['batches_s']:.0f} |", flush=True)
    return 0


def machine() -> str:
    model, cores = cpu_model(), usable_cores()
    versions = ", ".join(f"{p} {metadata.version(p)}" for p in ("torch", "monai", "numpy", "pydicom", "lightning"))
    return f"CPU: {model}, {cores} cores usable; Python {platform.python_version()}; {versions}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/medmae_bench"), help="archive + cache folder")
    parser.add_argument("--series", type=int, default=4)
    parser.add_argument("--slices-per-series", type=int, default=100)
    parser.add_argument("--size", type=int, default=224, help="output side")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--batches", type=int, default=30, help="timed batches per run (medmae)")
    parser.add_argument("--baseline-batches", type=int, default=4, help="timed batches per run (baseline)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--stack", type=int, nargs="+", default=[1, 3], help="slices per sample (1 = 2D)")
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument("--memory-series", type=int, nargs="+", help="measure worker memory at these S instead")
    parser.add_argument("--memory-batches", type=int, default=400, help="batches after the first (memory mode)")
    parser.add_argument("--memory-tree", type=Path, help="checkout to import medmae from (memory mode)")
    parser.add_argument("--memory-child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_child is not None:
        torch.set_num_threads(1)
        print(json.dumps(memory_child(args.memory_child, args.memory_batches)))
        return 0
    if args.memory_series:
        return memory_main(args)

    torch.set_num_threads(1)
    print(machine())
    print(f"load average before: {os.getloadavg()}")
    archive, cache = args.work / "archive", args.work / "cache"
    t0 = time.perf_counter()
    files = write_archive(archive, args.series, args.slices_per_series, 512)
    how = build_cache(archive, cache)
    print(f"archive: {args.series} series x {args.slices_per_series} slices, 512² int16 CT (rescale -1024)")
    print(f"cache built by: {how} ({time.perf_counter() - t0:.1f} s incl. archive)")
    print(f"output {args.size}², batch {args.batch}, torch threads 1, median of {args.repeats} runs\n")

    results: dict[tuple[str, int, int], tuple[float, float]] = {}
    n_samples = args.batch * (args.warmup + args.batches + 1) * 4
    for stack in args.stack:
        for workers in args.workers:
            pipelines = [
                (
                    "medmae",
                    lambda s=stack, w=workers: medmae_loader(cache, s, w, args.batch, args.size, n_samples),
                    args.batches,
                )
            ]
            if not args.no_baseline:
                pipelines.insert(
                    0,
                    (
                        "baseline",
                        lambda s=stack, w=workers: baseline_loader(files, s, w, args.batch, args.size, n_samples),
                        args.baseline_batches,
                    ),
                )
            for name, make, batches in pipelines:
                runs = [time_loader(make(), args.warmup, batches) for _ in range(args.repeats)]
                wall = statistics.median(r[0] for r in runs)
                cpu = statistics.median(r[1] for r in runs)
                results[(name, stack, workers)] = (wall, cpu)
                runs_s = ", ".join(f"{w:.0f}/s ({c:.0f} per CPU-s)" for w, c in runs)
                print(f"  {name:8s} slices={stack} workers={workers}: {runs_s}", flush=True)

    print(f"\nload average after: {os.getloadavg()}\n")
    print("wall: samples/s of the loader; CPU: samples per CPU-second of the loading processes")
    print("(= one unshared worker core); speed-ups are medmae / baseline.\n")
    print(
        "| input | workers | baseline wall /s | medmae wall /s | speed-up | medmae wall /s per worker "
        "| baseline per CPU-s | medmae per CPU-s | speed-up (CPU) |"
    )
    print("|" + "---|" * 9)
    for stack in args.stack:
        for workers in args.workers:
            ours_wall, ours_cpu = results[("medmae", stack, workers)]
            base = results.get(("baseline", stack, workers))
            label = "2D" if stack == 1 else f"2.5D (k={stack})"
            cells = [label, str(workers)]
            cells += [f"{base[0]:.0f}" if base else "-", f"{ours_wall:.0f}"]
            cells += [f"{ours_wall / base[0]:.1f}x" if base else "-", f"{ours_wall / max(workers, 1):.0f}"]
            cells += [f"{base[1]:.0f}" if base else "-", f"{ours_cpu:.0f}"]
            cells += [f"{ours_cpu / base[1]:.1f}x" if base else "-"]
            print("| " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
