"""Files per second pulled from a local Orthanc: ``medmae prep`` (DICOMweb source) against a plain
``dicomweb-client`` loop that retrieves the same instances and decodes the same pixels.

    python benchmarks/pacs_pull.py                           # 4 CT series x 64 slices x 256^2
    python benchmarks/pacs_pull.py --series 8 --slices 100 --size 512 --workers 2

Needs the Debian packages ``orthanc`` and ``orthanc-dicomweb`` (CI installs them). The script starts
its own Orthanc on free ports with storage in a temporary folder, uploads a synthetic CT archive,
then times, with Orthanc's cache warm (one untimed pull first):

* **client loop**: QIDO-RS series search, then for each series ``retrieve_series`` (one multipart
  request per series, the fastest way ``dicomweb-client`` offers), ``pixel_array`` + rescale of
  every instance in this process. It writes nothing and validates nothing.
* **medmae prep (DICOMweb)**: the whole ``prep_archive`` run from the DICOMweb source: QIDO-RS, WADO-RS
  metadata, series assembly and validation, one WADO-RS request per instance (metadata first: only
  instances of series that pass are pulled), decode, de-identify, statistics, atomic cache writes;
  its request-rate limit raised to ``--rate`` so that the comparison measures the work, not the
  default politeness (20 requests/s).
* **medmae prep (files)**: the same run on the files Orthanc was loaded from: what pulling costs on
  top of prep's own work.

It prints the machine and the timings; it asserts nothing about them (machines differ).
"""

from __future__ import annotations

import argparse
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cpu_model, usable_cores  # noqa: E402


def write_archive(root: Path, series: int, slices: int, size: int) -> int:
    """``series`` CT stacks of ``slices`` int16 ``size``² slices, one file each; returns the file count."""
    from tests.data_prep.factory import Identity, volume_series

    for s in range(series):
        volume_series(root / f"ct{s:03d}", n=slices, rows=size, cols=size, identity=Identity(patient_id=f"P{s}"),
                      seed=s)
    return series * slices


def client_loop(url: str, auth: tuple[str, str]) -> int:
    """The plain loop: search, retrieve each series, decode every instance; returns instances decoded."""
    import requests
    from dicomweb_client.api import DICOMwebClient

    session = requests.Session()
    session.auth = auth
    client = DICOMwebClient(url, session=session)
    n = 0
    for item in client.search_for_series(get_remaining=True):
        study, series = item["0020000D"]["Value"][0], item["0020000E"]["Value"][0]
        for ds in client.retrieve_series(study, series, media_types=(("application/dicom", "*"),)):
            values = ds.pixel_array.astype(np.float64) * float(ds.get("RescaleSlope", 1)) + float(
                ds.get("RescaleIntercept", 0))
            n += int(values.size > 0)
    session.close()
    return n


def medmae_pull(spec: str, credentials: Path, out: Path, workers: int, rate: float) -> int:
    from data_prep import prep_archive
    from data_prep.sources import open_source

    shutil.rmtree(out, ignore_errors=True)
    source = open_source(spec, credentials_file=credentials, rate=rate, connections=workers)
    summary = prep_archive([], out, salt_file=out.parent / "bench.salt", workers=workers, progress=False,
                           source=source)
    return summary.files_in_series


def medmae_files(archive: Path, out: Path, workers: int) -> int:
    from data_prep import prep_archive

    shutil.rmtree(out, ignore_errors=True)
    summary = prep_archive([archive], out, salt_file=out.parent / "bench.salt", workers=workers, progress=False)
    return summary.files_in_series


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--series", type=int, default=4)
    p.add_argument("--slices", type=int, default=64)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--workers", type=int, default=1, help="medmae build workers = connections")
    p.add_argument("--rate", type=float, default=1000.0, help="medmae's request limit per second")
    p.add_argument("--repeat", type=int, default=2, help="timed runs of each (the best is reported)")
    args = p.parse_args()

    import pydicom

    from tests.data_prep.orthanc import PASSWORD, USER, Orthanc

    work = Path(tempfile.mkdtemp(prefix="medmae-pacs-bench-"))
    server = None
    try:
        n_files = write_archive(work / "archive", args.series, args.slices, args.size)
        server = Orthanc(work / "orthanc").start()
        server.upload_tree(work / "archive")
        credentials = work / "credentials"
        credentials.write_text(PASSWORD)
        credentials.chmod(0o600)
        url = f"{server.url}/dicom-web"

        client_loop(url, (USER, PASSWORD))  # warm Orthanc's caches, untimed
        timings: dict[str, float] = {}
        for name, run in (
            ("dicomweb-client loop (retrieve_series + pixel_array)", lambda: client_loop(url, (USER, PASSWORD))),
            (f"medmae prep from DICOMweb, {args.workers} worker(s)",
             lambda: medmae_pull(server.dicomweb, credentials, work / "cache", args.workers, args.rate)),
            (f"medmae prep from the same files on disk, {args.workers} worker(s)",
             lambda: medmae_files(work / "archive", work / "cache_files", args.workers)),
        ):
            best = float("inf")
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                done = run()
                best = min(best, time.perf_counter() - t0)
            if done != n_files:
                print(f"warning: {name} handled {done} of {n_files} files")
            timings[name] = best
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)

    import dicomweb_client
    import pynetdicom

    print(f"machine: {cpu_model()}, {usable_cores()} cores available, {platform.system()} {platform.release()}")
    print(f"python {platform.python_version()}, pydicom {pydicom.__version__}, dicomweb-client "
          f"{dicomweb_client.__version__}, pynetdicom {pynetdicom.__version__}")
    print(f"archive: {args.series} CT series x {args.slices} slices x {args.size}^2 int16 = {n_files} files, "
          "local Orthanc over loopback")
    print(f"{'path':<60} {'wall s':>8} {'files/s':>9}")
    for name, seconds in timings.items():
        print(f"{name:<60} {seconds:8.2f} {n_files / seconds:9.1f}")
    loop, prep, files = list(timings.values())
    print(f"medmae prep from DICOMweb takes {prep / loop:.2f}x the plain loop's wall time (it also validates, "
          f"de-identifies, computes statistics and writes the cache) and {prep / files:.2f}x a prep of the files")


if __name__ == "__main__":
    main()
