"""A real Orthanc PACS for the PACS-source tests: DICOMweb plugin loaded, DIMSE enabled, free ports.

The Debian packages ``orthanc`` and ``orthanc-dicomweb`` provide the server (CI installs them like
dcm2niix). The ``Orthanc`` binary is started directly with a generated JSON configuration whose
storage lives in the test's tmp_path (no systemd, no shared state), HTTP basic authentication on,
and test archives are loaded through Orthanc's REST API (``POST /instances``). When Orthanc is not
installed the fixture fails loudly: these tests must never silently skip.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
import requests

from medmae.data.cache import MANIFEST_NAME, REJECT_REPORT_NAME
from tests.data_prep.factory import (
    BASIC_TEXT_SR,
    PYDICOM_FILES,
    Identity,
    Series,
    cr_image,
    enhanced_mr,
    non_image,
    secondary_capture,
    truncate,
    volume_series,
)
from tests.data_prep.hostile import codestream_claiming, deflated_dicom, fresh_copy, rle_claiming

ORTHANC_BINARY = "Orthanc"
DICOMWEB_PLUGIN_PATHS = (
    "/usr/share/orthanc/plugins/libOrthancDicomWeb.so",
    "/usr/lib/orthanc/libOrthancDicomWeb.so",
)
USER, PASSWORD = "medmae", "pacs-test-secret-93f1"
AE_TITLE = "ORTHANCTEST"
MOVE_AE = "MEDMAETEST"


def free_port() -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _plugin() -> str:
    for path in DICOMWEB_PLUGIN_PATHS:
        if os.path.isfile(path):
            return path
    pytest.fail("the Orthanc DICOMweb plugin is not installed: apt-get install -y orthanc orthanc-dicomweb",
                pytrace=False)


def _die_with_parent() -> None:
    """In the Orthanc child: SIGKILL when the test process goes away (a killed pytest leaves no server)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG


class Orthanc:
    """One Orthanc process with its own storage under ``root``; ``start`` / ``stop`` / ``upload``."""

    def __init__(self, root: Path, move_port: int | None = None) -> None:
        self.root = root
        self.http_port = free_port()
        self.dicom_port = free_port()
        self.move_port = move_port or free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.log = root / "orthanc.log"
        self.requests_log = root / "requests.log"
        self.deny_file = root / "deny.txt"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb(self) -> str:
        """The source spec ``medmae prep`` takes."""
        return f"dicomweb+http://{USER}@127.0.0.1:{self.http_port}/dicom-web"

    @property
    def dimse(self) -> str:
        return f"dimse://{AE_TITLE}@127.0.0.1:{self.dicom_port}"

    def _config(self) -> dict:
        storage = self.root / "storage"
        storage.mkdir(parents=True, exist_ok=True)
        return {
            "Name": "medmae-test",
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "StorageCompression": False,
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": True,
            "RegisteredUsers": {USER: PASSWORD},
            "DicomServerEnabled": True,
            "DicomAet": AE_TITLE,
            "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": True,
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowFind": True,
            "DicomAlwaysAllowGet": True,
            "DicomAlwaysAllowMove": True,
            "DicomAlwaysAllowStore": True,
            "DicomModalities": {"medmae": [MOVE_AE, "127.0.0.1", self.move_port]},
            "UnknownSopClassAccepted": True,
            "StorageAccessOnFind": "Always",
            "Plugins": [_plugin()],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "StudiesMetadata": "Full",
                         "SeriesMetadata": "Full"},
            "LuaScripts": [str(self._lua())],
            "HttpThreadsCount": 8,
            "ConcurrentJobs": 1,
        }

    def _lua(self) -> Path:
        """A Lua filter that records every HTTP request the server receives (what was transferred is
        then known from the server's side, not from ours) and refuses (HTTP 403) those whose URI
        holds a line of :attr:`deny_file`: a server that fails one request, for real."""
        script = self.root / "record.lua"
        log = str(self.requests_log).replace("\\", "\\\\").replace('"', '\\"')
        deny = str(self.deny_file).replace("\\", "\\\\").replace('"', '\\"')
        script.write_text(f"""
local path = "{log}"
local function record(line)
  local f = io.open(path, "a")
  f:write(line .. "\\n")
  f:close()
end
local deny = "{deny}"
function IncomingHttpRequestFilter(method, uri, ip, username, headers)
  record(method .. " " .. uri)
  local f = io.open(deny, "r")
  if f then
    for line in f:lines() do
      if line ~= "" and string.find(uri, line, 1, true) then
        f:close()
        return false
      end
    end
    f:close()
  end
  return true
end
""")
        return script

    def retrievals(self) -> list[str]:
        """The WADO-RS retrieve requests (a series or an instance; not QIDO, not metadata)."""
        return [r for r in self.requests() if r.startswith("GET /dicom-web/studies/") and "?" not in r
                and not r.endswith(("/metadata", "/instances", "/series"))]

    def requests(self) -> list[str]:
        """Every HTTP request so far, as ``"GET /dicom-web/..."`` lines."""
        try:
            return self.requests_log.read_text().splitlines()
        except FileNotFoundError:
            return []

    def start(self) -> Orthanc:
        binary = shutil.which(ORTHANC_BINARY) or (f"/usr/sbin/{ORTHANC_BINARY}"
                                                  if os.path.isfile(f"/usr/sbin/{ORTHANC_BINARY}") else None)
        if binary is None:
            pytest.fail("Orthanc is not installed: apt-get install -y orthanc orthanc-dicomweb", pytrace=False)
        config = self.root / "orthanc.json"
        config.write_text(json.dumps(self._config(), indent=1))
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen([binary, str(config)], stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True,
                                            preexec_fn=_die_with_parent)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"Orthanc exited at start ({self.process.returncode}); see {self.log}", pytrace=False)
            try:
                r = requests.get(f"{self.url}/dicom-web/studies", auth=(USER, PASSWORD), timeout=2)
                if r.status_code in (200, 204):
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.1)
        self.stop()
        pytest.fail(f"Orthanc did not answer within 30 s; see {self.log}", pytrace=False)

    def stop(self) -> None:
        """SIGKILL: a PACS that vanishes, not one that says goodbye."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)
        self.process = None

    def upload(self, paths: Iterable[Path]) -> int:
        """``POST /instances`` every file; returns how many Orthanc stored."""
        n = 0
        with requests.Session() as s:
            s.auth = (USER, PASSWORD)
            for p in paths:
                r = s.post(f"{self.url}/instances", data=Path(p).read_bytes(), timeout=30)
                r.raise_for_status()
                n += 1
        return n

    def upload_tree(self, root: Path) -> int:
        return self.upload(sorted(p for p in root.rglob("*") if p.is_file()))


# ----------------------------------------------------------------------------- test archives


@dataclass
class PacsArchive:
    """A folder of test DICOM files, what Orthanc accepted of it, and what must never be transferred."""

    root: Path
    series: dict[str, Series]  # name -> written series (a copy of each is in Orthanc)
    never_transferred: list[str]  # SOPInstanceUIDs of reports, secondary captures, localizers
    never_series: list[str]  # and their SeriesInstanceUIDs


def _modality_lut(ds: pydicom.Dataset, k: int) -> None:
    """Replace the rescale by a Modality LUT Sequence halving every stored value."""
    item = pydicom.Dataset()
    item.LUTDescriptor = [4096, 0, 16]
    item.ModalityLUTType = "US"
    item.add_new("LUTData", "US", [int(v) for v in np.arange(4096) // 2])  # US: the multi-valued form
    ds.ModalityLUTSequence = pydicom.Sequence([item])
    del ds.RescaleSlope, ds.RescaleIntercept


def build_archive(root: Path, identity: Identity | None = None, *, hostile: bool = True) -> PacsArchive:
    """Every kind of input prep treats specially, small: volumes (one RLE slice), an MR, a CR picture,
    an enhanced MR, a truncated slice, a report, a secondary capture, a localizer and, with
    ``hostile``, compressed samples (JPEG-LS, 12-bit JPEG, a deflated file) and files whose pixel data
    contradicts its header (an RLE stream too short, a JPEG 2000 codestream claiming 60000 x 60000)."""
    ident = identity or Identity()
    series = {
        "ct": volume_series(root / "ct", n=4, rle=(1,), identity=ident),
        "mr": volume_series(root / "mr", n=3, modality="MR", intercept=0, identity=ident, seed=2),
        "cr": cr_image(root / "cr" / "IM0", identity=ident),
        "emr": enhanced_mr(root / "emr" / "IM0", identity=ident),
        "trunc": volume_series(root / "trunc", n=4, identity=ident, seed=3),
        # values through a Modality LUT Sequence: a C-FIND answer cannot show it
        "mlut": volume_series(root / "mlut", n=3, modality="MR", identity=ident, seed=5, extra=_modality_lut),
    }
    truncate(series["trunc"].paths[3])
    sr = non_image(root / "sr" / "IM0", BASIC_TEXT_SR, "SR", identity=ident)
    sc = secondary_capture(root / "sc" / "IM0", identity=ident)
    loc = volume_series(root / "loc", n=2, identity=ident, image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"), seed=4)
    sr_ds = pydicom.dcmread(sr, stop_before_pixels=True)
    never = [sr_ds.SOPInstanceUID, *sc.sop_uids, *loc.sop_uids]
    never_series = [sr_ds.SeriesInstanceUID, sc.series_uid, loc.series_uid]
    if hostile:
        hostile_dir = root / "hostile"
        for name in ("MR_small_jpeg_ls_lossless.dcm", "JPGExtended.dcm"):
            ds = pydicom.dcmread(PYDICOM_FILES / name)
            fresh_copy(ds)
            ident.apply(ds)
            hostile_dir.mkdir(parents=True, exist_ok=True)
            ds.save_as(hostile_dir / Path(name).stem)
        deflated_dicom(series["mr"].paths[0], hostile_dir / "deflated", fresh=True)
        rle_claiming(hostile_dir / "rle_short", 1024, 1024)
        codestream_claiming("MR_small_jp2klossless.dcm", hostile_dir / "j2k_claims", 60000, 60000)
    return PacsArchive(root, series, never, never_series)


def load(server: Orthanc, archive: PacsArchive, files_copy: Path) -> list[Path]:
    """Upload every file of ``archive`` to Orthanc; copy what it stored (same bytes) to ``files_copy``,
    the folder a file-based prep must read to be comparable. Returns the stored files."""
    stored = []
    with requests.Session() as s:
        s.auth = (USER, PASSWORD)
        for p in sorted(q for q in archive.root.rglob("*") if q.is_file()):
            r = s.post(f"{server.url}/instances", data=p.read_bytes(), timeout=30)
            if r.status_code != 200:  # Orthanc refuses what it cannot parse at all
                continue
            target = files_copy / p.relative_to(archive.root)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(p, target)
            stored.append(target)
    return stored


class FlakyProxy:
    """An HTTP proxy in front of a server that answers every ``fail_every``-th GET itself with
    ``status`` (503, 429...) and ``Retry-After: 0``: a congested clinical network, for real sockets."""

    def __init__(self, target: str, fail_every: int = 3, status: int = 503) -> None:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        proxy = self
        self.count = 0
        self.failed = 0
        self._lock = threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                with proxy._lock:
                    proxy.count += 1
                    fail = proxy.count % fail_every == 0
                    proxy.failed += fail
                if fail:
                    self.send_response(status)
                    self.send_header("Retry-After", "0")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
                r = requests.get(target + self.path, headers=headers, timeout=30)
                self.send_response(r.status_code)
                for k, v in r.headers.items():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length", "content-encoding"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(r.content)))
                self.end_headers()
                self.wfile.write(r.content)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def spec(self) -> str:
        return f"dicomweb+http://{USER}@127.0.0.1:{self.port}/dicom-web"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# ----------------------------------------------------------------------------- comparing outputs


def cache_bytes(cache: Path) -> dict[str, bytes]:
    """Manifest, every series array and sidecar: what training reads, byte for byte."""
    files = {MANIFEST_NAME: (cache / MANIFEST_NAME).read_bytes()}
    for p in sorted((cache / "series").iterdir()):
        files[f"series/{p.name}"] = p.read_bytes()
    return files


def report(cache: Path) -> dict:
    return json.loads((cache / REJECT_REPORT_NAME).read_text())


def dicom_files_under(root: Path, skip: tuple[Path, ...] = ()) -> list[Path]:
    """Files under ``root`` (not below ``skip``) that are DICOM: a ``DICM`` preamble or a bare dataset
    pydicom can parse as an image (a raw dump of an instance)."""
    found = []
    for p in root.rglob("*"):
        if not p.is_file() or p.is_symlink() or any(p.is_relative_to(s) for s in skip):
            continue
        head = p.read_bytes()[:132]
        if head[128:132] == b"DICM":
            found.append(p)
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = pydicom.dcmread(p, force=True, stop_before_pixels=True)
        except Exception:  # noqa: BLE001 - not DICOM at all
            continue
        if "SOPInstanceUID" in ds or "PatientID" in ds:
            found.append(p)
    return found
