"""Benchmark ``medmae prep`` against dcm2niix on a synthetic CT archive.

    python benchmarks/prep.py                                    # 20 series x 200 slices x 512^2
    python benchmarks/prep.py --series 4 --slices 100 --size 256 # quick look
    python benchmarks/prep.py --workers 2 --keep /tmp/prep-bench # also time a 2-process run, keep files

The archive mimics a scanner export: one folder per series, files without extension, realistic
headers (~120 elements incl. private tags and a private sequence), shuffled InstanceNumber, every
``--rle-every``-th series RLE Lossless compressed. Timings are wall clock with the page cache warm
(every phase runs once untimed first is *not* done: the archive was just written, so it is cached).

Phases: "scan" is data_prep's header pass alone (``scan_archives``); "prep" is the whole
``prep_archive`` run (scan + assembly + decode + stats + atomic writes of arrays, sidecars,
manifest); "dcm2niix" converts the same archive to uncompressed NIfTI (``-z n -b n``).
"""

from __future__ import annotations

import argparse
import os
import platform
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
from machine import cpu_model, usable_cores  # noqa: E402


def _template(series_uid: str, study_uid: str, size: int, patient: int):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    for kw, v in [("StudyDate", "20240101"), ("SeriesDate", "20240101"), ("AcquisitionDate", "20240101"),
                  ("ContentDate", "20240101"), ("StudyTime", "101010"), ("SeriesTime", "101011"),
                  ("AcquisitionTime", "101012"), ("ContentTime", "101013"), ("AccessionNumber", "A123456"),
                  ("Modality", "CT"), ("Manufacturer", "ACME"), ("InstitutionName", "General Hospital"),
                  ("InstitutionAddress", "1 Main Street"), ("ReferringPhysicianName", "Ref^Doc"),
                  ("StationName", "CT01"), ("StudyDescription", "CHEST ABDOMEN PELVIS"),
                  ("SeriesDescription", "AXIAL 1.0 B30f"), ("ManufacturerModelName", "Scanner 9000"),
                  ("PatientName", f"Bench^Patient{patient}"), ("PatientID", f"BENCH{patient:04d}"),
                  ("PatientBirthDate", "19600101"), ("PatientSex", "O"), ("PatientAge", "064Y"),
                  ("BodyPartExamined", "CHEST"), ("SliceThickness", 1.0), ("KVP", 120),
                  ("DataCollectionDiameter", 500), ("SoftwareVersions", "VA1"), ("ProtocolName", "CAP"),
                  ("ReconstructionDiameter", 400), ("DistanceSourceToDetector", 1085.6),
                  ("DistanceSourceToPatient", 595), ("GantryDetectorTilt", 0), ("TableHeight", 150),
                  ("RotationDirection", "CW"), ("ExposureTime", 500), ("XRayTubeCurrent", 200),
                  ("Exposure", 100), ("FilterType", "FLAT"), ("GeneratorPower", 24),
                  ("FocalSpots", 1.2), ("ConvolutionKernel", "B30f"), ("PatientPosition", "HFS"),
                  ("StudyInstanceUID", study_uid), ("SeriesInstanceUID", series_uid), ("StudyID", "1"),
                  ("SeriesNumber", 3), ("AcquisitionNumber", 1), ("FrameOfReferenceUID", generate_uid()),
                  ("PositionReferenceIndicator", ""), ("SamplesPerPixel", 1),
                  ("PhotometricInterpretation", "MONOCHROME2"), ("Rows", size), ("Columns", size),
                  ("PixelSpacing", [400 / size, 400 / size]), ("BitsAllocated", 16), ("BitsStored", 12),
                  ("HighBit", 11), ("PixelRepresentation", 0), ("WindowCenter", 40), ("WindowWidth", 400),
                  ("RescaleIntercept", -1024), ("RescaleSlope", 1), ("RescaleType", "HU"),
                  ("ImageOrientationPatient", [1, 0, 0, 0, 1, 0])]:
        setattr(ds, kw, v)
    block = ds.private_block(0x0019, "ACME CT HEADER", create=True)
    for i in range(40):
        block.add_new(i + 1, "LO", f"private value {i}")
    item = Dataset()
    item.add_new(0x00091001, "LO", "nested private")
    block.add_new(0x50, "SQ", Sequence([item, item]))
    block.add_new(0x60, "OB", os.urandom(2048))  # a vendor blob, like a CSA header
    return ds


def build_archive(root: Path, n_series: int, n_slices: int, size: int, rle_every: int) -> int:
    """Write the synthetic archive; returns the number of files."""
    import copy

    from pydicom.uid import RLELossless, generate_uid

    rng = np.random.default_rng(0)
    n = 0
    for s in range(n_series):
        folder = root / f"study{s // 2:03d}" / f"series{s:03d}"
        folder.mkdir(parents=True)
        tpl = _template(generate_uid(), generate_uid(), size, patient=s // 2)
        compress = rle_every > 0 and s % rle_every == rle_every - 1
        yy, xx = np.mgrid[:size, :size]
        body = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2) < (0.45 * size) ** 2
        numbers = rng.permutation(n_slices) + 1
        for k in range(n_slices):
            ds = copy.deepcopy(tpl)
            ds.SOPInstanceUID = generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.InstanceNumber = int(numbers[k])
            ds.ImagePositionPatient = [-200.0, -200.0, -300.0 + k * 1.0]
            ds.SliceLocation = -300.0 + k
            img = np.where(body, 1000 + rng.integers(-60, 60, (size, size)), 24).astype(np.uint16)
            ds.PixelData = img.tobytes()
            if compress:
                ds.compress(RLELossless, encoding_plugin="pylibjpeg")
            ds.save_as(folder / f"IM{k:05d}", enforce_file_format=True)
            n += 1
    return n


def _stats_seconds(cache: Path) -> float:
    """Time medmae.data.cache.compute_stats alone over every array of a built cache."""
    from medmae.data.cache import compute_stats, load_manifest

    total = 0.0
    for row in load_manifest(cache).rows:
        arr = np.load(cache / row.array)
        total += _timed(lambda arr=arr: compute_stats(arr))
    return total


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--series", type=int, default=20)
    ap.add_argument("--slices", type=int, default=200)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--rle-every", type=int, default=4, help="every k-th series RLE compressed (0: none)")
    ap.add_argument("--workers", type=int, nargs="+", default=[1], help="prep worker counts to time")
    ap.add_argument("--keep", type=Path, default=None, help="work in this folder and keep it")
    args = ap.parse_args(argv)

    from data_prep import prep_archive
    from data_prep.scan import scan_archives

    dcm2niix = shutil.which("dcm2niix")
    work = args.keep or Path(tempfile.mkdtemp(prefix="medmae-prep-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    archive = work / "archive"
    try:
        if archive.exists():
            n_files = sum(len(f) for _, _, f in os.walk(archive))
        else:
            t = time.perf_counter()
            n_files = build_archive(archive, args.series, args.slices, args.size, args.rle_every)
            print(f"built archive: {n_files} files in {time.perf_counter() - t:.1f}s", file=sys.stderr)
        size_mb = sum(p.stat().st_size for p in archive.rglob("*") if p.is_file()) / 2**20

        rows: list[tuple[str, int, float]] = []
        for w in args.workers:
            rows.append((f"medmae scan (header pass), {w} worker(s)", w,
                         _timed(lambda w=w: scan_archives([archive], workers=w))))
        salt = work / "bench.salt"
        for w in args.workers:
            out = work / f"cache-w{w}"
            shutil.rmtree(out, ignore_errors=True)
            rows.append((f"medmae prep (scan+build+write), {w} worker(s)", w,
                         _timed(lambda out=out, w=w: prep_archive([archive], out, workers=w, salt_file=salt,
                                                                  progress=False))))
        if dcm2niix:
            out = work / "dcm2niix"
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir()
            rows.append(("dcm2niix -z n -b n (1 thread)", 1, _timed(lambda: subprocess.run(
                [dcm2niix, "-o", str(out), "-f", "%s_%j", "-z", "n", "-b", "n", str(archive)],
                check=True, capture_output=True))))
            version = subprocess.run([dcm2niix, "-v"], capture_output=True, text=True).stdout.split("\n")[0]
        else:
            version = "not installed"

        import pydicom

        print(f"\nmachine: {cpu_model()}, {usable_cores()} cores; Python {platform.python_version()}, "
              f"pydicom {pydicom.__version__}, dcm2niix {version.strip()}")
        print(f"archive: {args.series} CT series x {args.slices} slices x {args.size}^2 = {n_files} files, "
              f"{size_mb:.0f} MiB, every {args.rle_every}th series RLE; page cache warm\n")
        print("| step | wall s | files/s | files/s per core |")
        print("|---|---:|---:|---:|")
        for name, cores, secs in rows:
            print(f"| {name} | {secs:.2f} | {n_files / secs:.0f} | {n_files / secs / cores:.0f} |")
        stats_s = _stats_seconds(work / f"cache-w{args.workers[0]}")
        print(f"\ncompute_stats (medmae/data/cache.py) alone, re-timed on the {args.workers[0]}-worker cache: "
              f"{stats_s:.2f} s of the prep wall time")
        ref = next((s for n, _, s in rows if n.startswith("dcm2niix")), None)
        if ref:
            print()
            for name, cores, secs in rows:
                if name.startswith("medmae prep"):
                    print(f"{name}: {secs * cores / ref:.2f}x dcm2niix's core-seconds "
                          f"({secs / ref:.2f}x its wall time)")
            first = next(s for n, _, s in rows if n.startswith("medmae prep"))
            print(f"without compute_stats, 1st prep row: {(first - stats_s) / ref:.2f}x dcm2niix's wall time")
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
