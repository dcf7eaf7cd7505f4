"""Archive scale: how prep, the manifest and fit start-up grow with the number of archive files.

    python benchmarks/archive_scale.py                      # N = 10^3 and 10^4 files
    python benchmarks/archive_scale.py --sizes 1000         # the reduced mode the slow test runs
    python benchmarks/archive_scale.py --full               # adds 10^5 and 10^6 (hours on 2 cores)
    python benchmarks/archive_scale.py --keep /tmp/scale    # keep archives and caches (reused when present)

For each N a synthetic archive is written: many patients (1-3 studies each, 1-4 series per study),
CT and MR stacks of 5-80 slices and single CR images, matrices of 16², 32² or 64², realistic
headers written by pydicom (~70 elements with patient/study/equipment fields, 40 private tags, a
private sequence and a vendor blob), extensionless files in patient/study/series folders, 3 % junk
(text, empty, truncated DICOM, random bytes) and 1 % duplicate instances in copy folders. The
headers of a series are written by pydicom once; each instance patches its UID, position, number
and pixels into that template, so generation is fast enough for 10^6 files.

Each stage runs in a fresh process (``--stage``) so its peak RSS is its own:

* ``scan``: ``scan_archives`` (header pass, 1 worker); ``assemble``: series assembly of its records
  (same process: its peak RSS includes the scan's records);
* ``prep``: a first ``prep_archive`` run, 1 build worker (scan + assemble + build + manifest);
  ``rerun``: the same again, nothing changed (scan + fingerprints, every series skipped);
  ``grow``: a rerun after 1 % more files (new series) were added;
* ``manifest write`` / ``manifest read``: ``write_prep_manifest`` / ``load_manifest`` of the cache's rows;
* ``setup``: ``CacheDataModule.setup("fit")`` (manifest read, entry check, slice index);
  ``first batch``: from ``iter(train_dataloader())`` to the first batch (2 loader workers);
  ``loader worker``: steady-state memory of one loader worker after 40 batches: RSS and USS (its
  private pages, ``/proc/<pid>/smaps_rollup``; RSS also counts pages shared with the main process).

Series scale (``--series``): an archive of 10^6 files holds only ~25,000 such series, so the
manifest, ``setup`` and the loader are also measured on synthetic caches of S series (tiny 4 x 16 x 16
arrays and their manifest rows, written directly): ``manifest write``, ``manifest read``, ``setup``,
``first batch`` and ``loader worker`` again, against S.

Reported per stage: wall seconds, files per CPU-second (N over the user+system time of the
process and its children: one core's throughput), peak RSS of the process and of its largest child,
and the growth exponent over the sizes run: the slope of log(CPU seconds) on log(N) (wall seconds
for the loader rows), 1 = linear. CPU time, not wall time: on a shared machine other users' load
stretches wall time but hardly the CPU a stage uses.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cpu_model, smaps_mib  # noqa: E402

UID_ROOT = "1.2.826.0.1.3680043.10.1137"
STAGES = ("scan", "assemble", "prep", "rerun", "grow", "manifest write", "manifest read", "setup", "first batch",
          "loader worker")
JUNK_FRACTION = 0.03
DUPLICATE_FRACTION = 0.01


# ----------------------------------------------------------------------------- the synthetic archive


def _placeholders(series: int) -> dict[str, str]:
    """Fixed-width values patched per instance (each must occur exactly as often as expected)."""
    return {
        "sop": f"{UID_ROOT}.2.{10**9 + series}.1999999",  # file meta + SOPInstanceUID: 2 occurrences
        "z": "-9876.125",  # ImagePositionPatient z, patched as f"{z:+09.3f}"
        "number": "424242",  # InstanceNumber (IS)
    }


def _template(modality: str, series: int, patient: int, study: int, size: int):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import ComputedRadiographyImageStorage, CTImageStorage, ExplicitVRLittleEndian, MRImageStorage

    sop_class = {"CT": CTImageStorage, "MR": MRImageStorage, "CR": ComputedRadiographyImageStorage}[modality]
    ph = _placeholders(series)
    ds = Dataset()
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = ph["sop"]
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL" if modality != "CR" else ""]
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = ph["sop"]
    date = f"20{10 + patient % 14:02d}{1 + study % 12:02d}{1 + patient % 28:02d}"
    for kw, v in [("StudyDate", date), ("SeriesDate", date), ("AcquisitionDate", date), ("ContentDate", date),
                  ("StudyTime", "101010"), ("SeriesTime", "101011"), ("AccessionNumber", f"A{patient:07d}{study}"),
                  ("Modality", modality), ("Manufacturer", "ACME"), ("InstitutionName", "General Hospital"),
                  ("InstitutionAddress", "1 Main Street"), ("ReferringPhysicianName", "Ref^Doc"),
                  ("StationName", f"{modality}01"), ("StudyDescription", "CHEST ABDOMEN PELVIS"),
                  ("SeriesDescription", f"{modality} series {series}"), ("ManufacturerModelName", "Scanner 9000"),
                  ("PatientName", f"Scale^Patient{patient}"), ("PatientID", f"SCALE{patient:08d}"),
                  ("PatientBirthDate", f"19{40 + patient % 50:02d}0101"), ("PatientSex", "O"),
                  ("BodyPartExamined", "CHEST"), ("SoftwareVersions", "VA1"), ("ProtocolName", "PROTO"),
                  ("StudyInstanceUID", f"{UID_ROOT}.1.{10**9 + patient}.{study + 1}"),
                  ("SeriesInstanceUID", f"{UID_ROOT}.3.{10**9 + series}"), ("StudyID", str(study)),
                  ("SeriesNumber", series % 100), ("AcquisitionNumber", 1), ("InstanceNumber", ph["number"]),
                  ("SamplesPerPixel", 1), ("PhotometricInterpretation", "MONOCHROME2"), ("Rows", size),
                  ("Columns", size), ("BitsAllocated", 16), ("BitsStored", 12), ("HighBit", 11),
                  ("PixelRepresentation", 0)]:
        setattr(ds, kw, v)
    if modality == "CR":
        ds.ImagerPixelSpacing = [0.2, 0.2]
    else:
        ds.FrameOfReferenceUID = f"{UID_ROOT}.4.{10**9 + series}"
        ds.PixelSpacing = [round(300 / size, 4)] * 2
        ds.SliceThickness = 2.0
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = ["-150.000", "-150.000", ph["z"]]
    if modality == "CT":
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
        ds.KVP, ds.ConvolutionKernel = 120, "B30f"
    if modality == "MR":
        ds.EchoTime, ds.RepetitionTime, ds.MagneticFieldStrength = 4.5, 500.0, 3.0
    block = ds.private_block(0x0019, "ACME HEADER", create=True)
    for i in range(40):
        block.add_new(i + 1, "LO", f"private value {i}")
    item = Dataset()
    item.add_new(0x00091001, "LO", "nested private")
    block.add_new(0x50, "SQ", Sequence([item, item]))
    block.add_new(0x60, "OB", bytes(512))  # a vendor blob, like a CSA header
    ds.PixelData = bytes(size * size * 2)
    return ds


def _template_bytes(ds) -> bytes:
    import io

    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


class _Patcher:
    """Writes instances of one series by patching a pydicom-written template at fixed offsets."""

    def __init__(self, data: bytes, series: int, volume: bool, pixel_bytes: int) -> None:
        ph = _placeholders(series)
        self.data, self.pixel_bytes = data, pixel_bytes
        self.offsets: dict[str, list[int]] = {}
        for key, count in (("sop", 2), ("z", 1 if volume else 0), ("number", 1)):
            found, start = [], 0
            while (i := data.find(ph[key].encode(), start)) >= 0:
                found.append(i)
                start = i + 1
            if len(found) != count:
                raise RuntimeError(f"template placeholder {key} found {len(found)} times, expected {count}")
            self.offsets[key] = found
        self.series = series

    def instance(self, k: int, z: float, pixels: np.ndarray) -> bytes:
        out = bytearray(self.data)
        values = {"sop": f"{UID_ROOT}.2.{10**9 + self.series}.{10**6 + k}", "z": f"{z:+09.3f}",
                  "number": f"{k + 1:>6}"}
        for key, offsets in self.offsets.items():
            raw = values[key].encode()
            for o in offsets:
                out[o:o + len(raw)] = raw
        out[len(out) - self.pixel_bytes:] = pixels.astype("<u2").tobytes()
        return bytes(out)


def generate_archive(root: Path, n_files: int, seed: int = 0, first_series: int = 0,
                     first_patient: int = 0) -> dict[str, int]:
    """Write ``n_files`` files under ``root``; returns counts by kind."""
    import warnings

    warnings.filterwarnings("ignore", module="pydicom")
    rng = np.random.default_rng(seed)
    n_junk = max(1, round(JUNK_FRACTION * n_files))
    n_dup = max(1, round(DUPLICATE_FRACTION * n_files))
    n_dicom = n_files - n_junk - n_dup
    written: list[Path] = []
    folders: list[Path] = []
    series, patient = first_series, first_patient
    counts = {"dicom": 0, "junk": 0, "duplicates": 0, "series": 0, "patients": 0}
    while len(written) < n_dicom:
        patient += 1
        counts["patients"] += 1
        for study in range(int(rng.integers(1, 4))):
            for _ in range(int(rng.integers(1, 5))):
                if len(written) >= n_dicom:
                    break
                series += 1
                counts["series"] += 1
                modality = str(rng.choice(["CT", "MR", "CR"], p=[0.5, 0.35, 0.15]))
                n = 1 if modality == "CR" else int(rng.integers(5, 81))
                n = min(n, n_dicom - len(written))
                size = 64 if modality == "CR" else int(rng.choice([16, 32, 64]))
                folder = root / f"{patient // 1000:04d}" / f"pat{patient:07d}" / f"st{study}" / f"se{series:07d}"
                folder.mkdir(parents=True, exist_ok=True)
                folders.append(folder)
                patcher = _Patcher(_template_bytes(_template(modality, series, patient, study, size)), series,
                                   modality != "CR", size * size * 2)
                base = rng.integers(0, 3000, size=(size, size))
                for k in range(n):
                    pixels = (base + 7 * k) % 4000
                    path = folder / f"IM{k:05d}"
                    path.write_bytes(patcher.instance(k, -300.0 + 2.0 * k, pixels))
                    written.append(path)
    counts["dicom"] = len(written)
    for i in range(n_dup):  # another copy of an instance in a copy folder: duplicate_instance
        src = written[int(rng.integers(len(written)))]
        dst = src.parent.with_name(src.parent.name + "_copy") / f"{src.name}_{i}"
        dst.parent.mkdir(exist_ok=True)
        shutil.copyfile(src, dst)
    counts["duplicates"] = n_dup
    for i in range(n_junk):
        folder = folders[int(rng.integers(len(folders)))]
        kind = i % 4
        if kind == 0:
            (folder / f"report_{i}.txt").write_text("Findings: none.\n" * 20)
        elif kind == 1:
            (folder / f"empty_{i}").write_bytes(b"")
        elif kind == 2:
            src = written[int(rng.integers(len(written)))].read_bytes()
            (folder / f"cut_{i}").write_bytes(src[: len(src) // 3])
        else:
            (folder / f"blob_{i}.bin").write_bytes(rng.integers(0, 256, 700, dtype=np.uint8).tobytes())
    counts["junk"] = n_junk
    return counts


# ----------------------------------------------------------------------------- stages (child processes)


def _rusage() -> tuple[float, float, float]:
    """(CPU seconds of this process and its children, peak RSS MiB self, peak RSS MiB of the largest child)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime, me.ru_maxrss / 1024, kids.ru_maxrss / 1024


def run_stage(stage: str, archive: Path, cache: Path, salt: Path) -> dict[str, dict[str, float]]:
    """Run one stage group in this (fresh) process; wall and CPU seconds, peak RSS per stage."""
    import logging

    logging.disable(logging.WARNING)  # prep's per-file warnings (junk, truncated files) are expected here
    out: dict[str, dict[str, float]] = {}

    def measure(name: str, fn):
        cpu0 = _rusage()[0]
        t = time.perf_counter()
        result = fn()
        wall = time.perf_counter() - t
        cpu, rss, kids = _rusage()
        out[name] = {"wall": wall, "cpu": cpu - cpu0, "rss": rss, "child_rss": kids}
        return result

    if stage == "scan":
        from data_prep.scan import scan_archives
        from data_prep.series import assemble

        records = measure("scan", lambda: scan_archives([archive], workers=1))
        measure("assemble", lambda: assemble(records))
    elif stage in ("prep", "rerun", "grow"):
        from data_prep import prep_archive

        summary = measure(stage, lambda: prep_archive([archive], cache, salt_file=salt, workers=1, progress=False))
        out[stage]["series_built"] = summary.series_built
        out[stage]["series_in_manifest"] = summary.series_in_manifest
    elif stage == "manifest":
        from data_prep.pipeline import write_prep_manifest
        from medmae.data.cache import MANIFEST_NAME, load_manifest

        manifest = measure("manifest read", lambda: load_manifest(cache))
        with tempfile.TemporaryDirectory(dir=cache.parent) as tmp:
            measure("manifest write", lambda: write_prep_manifest(Path(tmp), manifest.rows, 0.1, "bench"))
        out["manifest read"]["bytes"] = (cache / MANIFEST_NAME).stat().st_size
        out["manifest read"]["series"] = len(manifest.rows)
    elif stage == "synth":
        measure("synth", lambda: synthetic_cache(cache, int(archive.name)))
    elif stage == "loader":
        from medmae.data import CacheDataModule, LoaderOptions, SamplingOptions, SelectionOptions

        dm = CacheDataModule(str(cache), img_size=32, batch_size=16, num_workers=2,
                             selection=SelectionOptions(min_size=8),
                             loader=LoaderOptions(pin_memory=False, persistent_workers=False),
                             sampling=SamplingOptions(samples_per_epoch=16 * 64))
        measure("setup", lambda: dm.setup("fit"))
        it = None

        def first():
            nonlocal it
            it = iter(dm.train_dataloader())
            return next(it)

        measure("first batch", first)
        t = time.perf_counter()
        for _ in range(40):
            next(it)
        # RSS counts the pages a forked worker still shares with the main process (torch, the index
        # arrays); USS (its private pages) is what each worker costs on its own, the figure to compare
        mem = [smaps_mib(w.pid) for w in it._workers]  # noqa: SLF001 - the loader's own worker handles
        out["loader worker"] = {"wall": time.perf_counter() - t, "cpu": float("nan"), "rss": float("nan"),
                                "child_rss": max(m["rss"] for m in mem), "uss": max(m["uss"] for m in mem)}
        del it
    else:
        raise SystemExit(f"unknown stage {stage!r}")
    return out


def synthetic_cache(cache: Path, n_series: int) -> None:
    """A cache of ``n_series`` tiny CT volumes (4 x 16 x 16 int16) and its manifest, written directly
    (plain ``np.save``: what is measured is reading it); patients of 3 series, 10 % in ``val``."""
    from data_prep.pipeline import write_prep_manifest
    from medmae.data.cache import ManifestRow, compute_stats, series_array_path

    arr = ((np.arange(4 * 16 * 16) * 37) % 1500 - 1000).astype(np.int16).reshape(4, 16, 16)
    stats = compute_stats(arr)
    affine = ((0.8, 0.0, 0.0, -10.0), (0.0, 0.8, 0.0, -10.0), (0.0, 0.0, 2.0, 0.0), (0.0, 0.0, 0.0, 1.0))
    (cache / "series").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n_series):
        sid = f"s{i:020x}"
        np.save(cache / series_array_path(sid), arr)
        rows.append(ManifestRow(series_id=sid, patient_id=f"p{i // 3:020x}", modality="CT", source="dicom",
                                kind="volume", array=series_array_path(sid), shape=(4, 16, 16), spacing=(2.0, 0.8, 0.8),
                                dtype="int16", intensity="HU", stats=stats, affine=affine, modality_source="dicom",
                                split="val" if i % 10 == 0 else "train"))
    write_prep_manifest(cache, rows, 0.1, "synthetic")


def measure_series(n_series: int, work: Path) -> dict[str, dict[str, float]]:
    """The manifest and loader stages on a synthetic cache of ``n_series`` series."""
    cache = work / f"series-cache-{n_series}"
    if not (cache / "manifest.json").is_file():
        shutil.rmtree(cache, ignore_errors=True)
        _child("synth", Path(str(n_series)), cache, work / "unused.salt")
    results = _child("manifest", cache, cache, work / "unused.salt")
    results.update(_child("loader", cache, cache, work / "unused.salt"))
    return results


def _child(stage: str, archive: Path, cache: Path, salt: Path) -> dict[str, dict[str, float]]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--stage", stage, "--archive", str(archive),
           "--cache", str(cache), "--salt", str(salt)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"stage {stage} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- driver


def measure_size(n: int, work: Path) -> tuple[dict[str, int], dict[str, dict[str, float]]]:
    """Generate the archive of ``n`` files (unless kept from before) and run every stage on it."""
    archive, cache, salt = work / f"archive-{n}", work / f"cache-{n}", work / f"cache-{n}.salt"
    counts_file = work / f"archive-{n}.json"
    if not counts_file.is_file():
        shutil.rmtree(archive, ignore_errors=True)
        t = time.perf_counter()
        counts = generate_archive(archive, n)
        counts["generate_seconds"] = round(time.perf_counter() - t, 1)
        counts_file.write_text(json.dumps(counts))
    counts = json.loads(counts_file.read_text())
    shutil.rmtree(cache, ignore_errors=True)
    salt.unlink(missing_ok=True)
    results: dict[str, dict[str, float]] = {}
    for stage in ("scan", "prep", "rerun"):
        results.update(_child(stage, archive, cache, salt))
    grown = archive / "grown"  # +1 % files as new patients: the monthly increment
    shutil.rmtree(grown, ignore_errors=True)
    generate_archive(grown, max(10, n // 100), seed=1, first_series=10**8, first_patient=10**7)
    try:
        results.update(_child("grow", archive, cache, salt))
    finally:
        shutil.rmtree(grown, ignore_errors=True)
    results.update(_child("manifest", archive, cache, salt))
    results.update(_child("loader", archive, cache, salt))
    return counts, results


def exponent(ns: list[int], walls: list[float]) -> float:
    """Least-squares slope of log(wall) on log(N): the growth exponent (1 = linear)."""
    pts = [(math.log(n), math.log(w)) for n, w in zip(ns, walls, strict=True) if w > 0 and math.isfinite(w)]
    if len(pts) < 2:
        return float("nan")
    mx = sum(x for x, _ in pts) / len(pts)
    my = sum(y for _, y in pts) / len(pts)
    den = sum((x - mx) ** 2 for x, _ in pts)
    return sum((x - mx) * (y - my) for x, y in pts) / den if den else float("nan")


def _growth_seconds(r: dict[str, float]) -> float:
    """CPU seconds where measured (robust to other users' load), else wall seconds."""
    cpu = r.get("cpu", float("nan"))
    return cpu if math.isfinite(cpu) and cpu > 0 else r["wall"]


def _stage_exponent(stage: str, sizes: list[int], results: list[dict[str, float]]) -> float:
    """Growth exponent of a stage's time; none for the loader worker row, which measures memory
    (its RSS carries ~460 MiB of torch: compare the MiB across sizes instead)."""
    if stage == "loader worker":
        return float("nan")
    return exponent(sizes, [_growth_seconds(r) for r in results])


def _cpu_text(r: dict[str, float]) -> str:
    cpu = r.get("cpu", float("nan"))
    return f"{cpu:.2f}" if math.isfinite(cpu) else "-"


def format_series_table(sizes: list[int], per_s: dict[int, dict[str, dict[str, float]]]) -> str:
    lines = ["| stage | series S | wall s | CPU s | peak RSS MiB (process / largest child) | growth exponent |",
             "|---|---:|---:|---:|---:|---:|"]
    for stage in ("manifest write", "manifest read", "setup", "first batch", "loader worker"):
        slope = _stage_exponent(stage, sizes, [per_s[s][stage] for s in sizes])
        for i, n in enumerate(sizes):
            r = per_s[n][stage]
            mem = (f"{r['rss']:,.0f} / {r['child_rss']:,.0f}" if math.isfinite(r["rss"])
                   else f"worker {r['child_rss']:,.0f} (private {r['uss']:,.0f})")
            exp = f"{slope:.2f}" if i == len(sizes) - 1 and math.isfinite(slope) else ""
            lines.append(f"| {stage} | {n:,} | {r['wall']:.2f} | {_cpu_text(r)} | {mem} | {exp} |")
    return "\n".join(lines)


#: stages whose work is per archive file (the others work per series or per batch)
_PER_FILE = ("scan", "assemble", "prep", "rerun", "grow")


def format_table(ns: list[int], per_n: dict[int, tuple[dict[str, int], dict[str, dict[str, float]]]]) -> str:
    lines = ["| stage | N files | series in archive | wall s | CPU s | files/s per core "
             "| peak RSS MiB (process / largest child) | growth exponent |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for stage in STAGES:
        slope = _stage_exponent(stage, ns, [per_n[n][1][stage] for n in ns])
        for i, n in enumerate(ns):
            counts, res = per_n[n]
            r = res[stage]
            cpu = r.get("cpu", float("nan"))
            rate = f"{n / cpu:,.0f}" if stage in _PER_FILE and cpu > 0 else "-"
            rss = r["rss"]
            mem = (f"{rss:,.0f} / {r['child_rss']:,.0f}" if math.isfinite(rss)
                   else f"worker {r['child_rss']:,.0f} (private {r['uss']:,.0f})")
            exp = f"{slope:.2f}" if i == len(ns) - 1 and math.isfinite(slope) else ""
            lines.append(f"| {stage} | {n:,} | {counts['series']:,} | {r['wall']:.2f} | {_cpu_text(r)} | {rate} "
                         f"| {mem} | {exp} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="*", default=[1000, 10000],
                    help="archive sizes N (files; none: only the series scale)")
    ap.add_argument("--series", type=int, nargs="*", default=[1000, 10000, 100000],
                    help="synthetic cache sizes S (series) for the manifest and loader stages (none: skip)")
    ap.add_argument("--full", action="store_true", help="add N = 10^5 and 10^6 files")
    ap.add_argument("--keep", type=Path, default=None, help="work in this folder and keep it")
    ap.add_argument("--json", type=Path, default=None, help="also write the raw results here")
    ap.add_argument("--stage", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--archive", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--cache", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--salt", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.stage is not None:
        print(json.dumps(run_stage(args.stage, args.archive, args.cache, args.salt)))
        return 0
    ns = sorted(set(args.sizes) | ({10**5, 10**6} if args.full else set()))
    if any(n < 100 for n in ns):
        ap.error("--sizes: each N must be at least 100 files")
    work = args.keep or Path(tempfile.mkdtemp(prefix="medmae-archive-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    per_n = {}
    per_s = {}
    series_sizes = sorted(set(args.series))
    try:
        for n in ns:
            t = time.perf_counter()
            per_n[n] = measure_size(n, work)
            print(f"N = {n}: {per_n[n][0]} measured in {time.perf_counter() - t:.0f}s", file=sys.stderr)
        for n in series_sizes:
            t = time.perf_counter()
            per_s[n] = measure_series(n, work)
            print(f"S = {n} series measured in {time.perf_counter() - t:.0f}s", file=sys.stderr)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    import pydicom

    print(f"machine: {cpu_model()}, {len(os.sched_getaffinity(0))} cores available; Python "
          f"{platform.python_version()}, pydicom {pydicom.__version__}; prep with 1 build worker, loader with 2")
    if per_n:
        print(format_table(ns, per_n))
    for n in ns:
        m = per_n[n][1]["manifest read"]
        print(f"N = {n:,}: manifest {m['bytes'] / 1024:,.0f} KiB for {m['series']:,.0f} series "
              f"({m['bytes'] / max(m['series'], 1):,.0f} bytes per series)")
    if per_s:
        print(format_series_table(series_sizes, per_s))
        for n in series_sizes:
            m = per_s[n]["manifest read"]
            print(f"S = {n:,}: manifest {m['bytes'] / 2**20:,.1f} MiB")
    if args.json is not None:
        doc = {"files": {str(n): {"counts": c, "stages": r} for n, (c, r) in per_n.items()},
               "series": {str(n): r for n, r in per_s.items()}}
        args.json.write_text(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
