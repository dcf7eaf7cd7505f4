"""Prep from a real Orthanc over DICOMweb: the same cache as from files, the query honoured, nothing
but headers for what is refused, one-line errors, no identifier in any output, no DICOM on disk."""

from __future__ import annotations

import logging
from pathlib import Path

import pydicom
import pytest

from data_prep import prep_archive
from data_prep.cli import main
from data_prep.sources import PacsError, open_source
from medmae.data.cache import MANIFEST_NAME
from tests.data_prep.factory import Identity, volume_series
from tests.data_prep.orthanc import (
    PASSWORD,
    USER,
    FlakyProxy,
    Orthanc,
    build_archive,
    cache_bytes,
    dicom_files_under,
    free_port,
    load,
    report,
)
from tests.data_prep.test_privacy import NEEDLES, _haystack_hits

pytest_plugins = ("tests.data_prep.orthanc_fixtures",)  # orthanc, credentials


def test_pull_equals_files(orthanc: Orthanc, credentials: Path, tmp_path: Path) -> None:
    archive = build_archive(tmp_path / "written")
    stored = load(orthanc, archive, tmp_path / "files")
    assert len(stored) >= 20  # Orthanc kept (nearly) everything, hostile files included
    salt = tmp_path / "shared.salt"
    from_files = prep_archive([tmp_path / "files"], tmp_path / "from_files", salt_file=salt, progress=False)
    source = open_source(orthanc.dicomweb, credentials_file=credentials)
    pulled = prep_archive([], tmp_path / "pulled", salt_file=salt, progress=False, source=source, workers=2)

    assert pulled.series_in_manifest == from_files.series_in_manifest >= 8
    assert cache_bytes(tmp_path / "pulled") == cache_bytes(tmp_path / "from_files")
    files, pull = report(tmp_path / "from_files"), report(tmp_path / "pulled")
    assert pull["files_seen"] == files["files_seen"] == len(stored)
    assert pull["counts"] == files["counts"]
    assert {"localizer", "secondary_capture", "non_image_sop", "size_mismatch", "pixel_decode_failed"} <= set(
        pull["counts"])

    # metadata first: reports, secondary captures and localizers were never retrieved
    retrievals = orthanc.retrievals()
    assert len(retrievals) >= 8
    refused = archive.never_transferred + archive.never_series
    assert [r for r in retrievals if any(uid in r for uid in refused)] == []
    # the report's series was listed, never read (its metadata holds the report text)
    sr_series = pydicom.dcmread(next((tmp_path / "files" / "sr").iterdir())).SeriesInstanceUID
    assert not any(sr_series in r and r.endswith("/metadata") for r in orthanc.requests())


def test_rerun_pulls_nothing_again(orthanc: Orthanc, credentials: Path, tmp_path: Path) -> None:
    archive = build_archive(tmp_path / "written", hostile=False)
    load(orthanc, archive, tmp_path / "files")
    first = prep_archive([], tmp_path / "cache", progress=False, source=open_source(orthanc.dicomweb,
                         credentials_file=credentials))
    before = len(orthanc.requests())
    again = prep_archive([], tmp_path / "cache", progress=False, source=open_source(orthanc.dicomweb,
                         credentials_file=credentials))
    assert again.series_skipped == first.series_built and again.series_built == 0
    assert orthanc.retrievals()[before:] == [] and orthanc.requests()[before:]  # metadata only


def test_query_selects_what_it_says(orthanc: Orthanc, credentials: Path, tmp_path: Path) -> None:
    early, late = Identity(study_date="20200102"), Identity(study_date="20240615", patient_id="PAT-0002")
    ct_early = volume_series(tmp_path / "a" / "ct_early", n=3, identity=early)
    mr_early = volume_series(tmp_path / "a" / "mr_early", n=3, modality="MR", intercept=0, identity=early, seed=1)
    ct_late = volume_series(tmp_path / "a" / "ct_late", n=3, identity=late, seed=2)
    orthanc.upload_tree(tmp_path / "a")

    def pulled(name: str, **kw: object) -> tuple[int, int]:
        summary = prep_archive([], tmp_path / name, progress=False, salt_file=tmp_path / "salt",
                               source=open_source(orthanc.dicomweb, credentials_file=credentials, **kw))
        return summary.files_seen, summary.series_in_manifest

    assert pulled("all") == (9, 3)
    assert pulled("ct", query=["Modality=CT"]) == (6, 2)
    assert pulled("ct2024", query=["Modality=CT", "StudyDate=20240101-20241231"]) == (3, 1)
    assert pulled("mr", query=["Modality=MR"]) == (3, 1)
    uids = tmp_path / "uids.txt"
    uids.write_text(f"# one series, one study\n{ct_early.series_uid}\n\n{late.study_uid}\n")
    assert pulled("uids", uids_file=uids) == (6, 2)
    # the filters went to the server: nothing outside them was even listed
    metadata = [r for r in orthanc.requests() if r.endswith("/metadata")]
    assert not any(mr_early.series_uid in r for r in metadata[-2:])
    with pytest.raises(PacsError, match="not a DICOM keyword"):
        open_source(orthanc.dicomweb, credentials_file=credentials, query=["Modalty=CT"])
    uids.write_text("1.2.3\nnot-a-uid\n")
    with pytest.raises(PacsError, match="line 2 is not a DICOM UID"):
        open_source(orthanc.dicomweb, credentials_file=credentials, uids_file=uids)
    assert ct_late  # written and uploaded above


def _one_line_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_errors_are_one_line(orthanc: Orthanc, credentials: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    out = ["--out", str(tmp_path / "cache"), "--quiet"]
    wrong = tmp_path / "wrong.credentials"
    wrong.write_text("not-the-password\n")
    wrong.chmod(0o600)
    err = _one_line_error(capsys, [orthanc.dicomweb, "--pacs-credentials", str(wrong), *out])
    assert "refused the credentials" in err and "HTTP 401" in err and "not-the-password" not in err
    monkeypatch.setenv("MEDMAE_PACS_CREDENTIALS", "env-secret-xyz")
    err = _one_line_error(capsys, [orthanc.dicomweb, *out])
    assert "HTTP 401" in err and "env-secret-xyz" not in err

    dead = f"dicomweb+http://{USER}@127.0.0.1:{free_port()}/dicom-web"
    err = _one_line_error(capsys, [dead, "--pacs-credentials", str(credentials), "--pacs-retries", "1", *out])
    assert "unreachable" in err and dead.replace(f"{USER}@", "").removeprefix("dicomweb+") in err

    err = _one_line_error(capsys, [orthanc.dicomweb.replace(f"{USER}@", f"{USER}:{PASSWORD}@"), *out])
    assert "no password in the source URL" in err and PASSWORD not in err
    credentials.chmod(0o644)
    err = _one_line_error(capsys, [orthanc.dicomweb, "--pacs-credentials", str(credentials), *out])
    assert "readable by other users" in err
    err = _one_line_error(capsys, [orthanc.dicomweb, str(tmp_path), *out])
    assert "not both" in err
    err = _one_line_error(capsys, [str(tmp_path), "--query", "Modality=CT", *out])
    assert "needs a PACS source" in err
    assert not (tmp_path / "cache" / MANIFEST_NAME).exists()


def test_tls_is_verified(tmp_path: Path) -> None:
    """An https server with a certificate nobody vouches for is refused (verification is not optional)."""
    import ssl
    import subprocess
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)

    class Answer(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            self.send_response(200)
            self.send_header("Content-Type", "application/dicom+json")
            self.end_headers()
            self.wfile.write(b"[]")

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Answer)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        spec = f"dicomweb+https://127.0.0.1:{server.server_address[1]}/dicom-web"
        with pytest.raises(Exception, match="TLS verification failed"):
            prep_archive([], tmp_path / "cache", progress=False, source=open_source(spec, retries=0))
        # with the CA that signed it, the same server is trusted (and found empty)
        summary = prep_archive([], tmp_path / "cache", progress=False,
                               source=open_source(spec, retries=0, ca_bundle=cert))
        assert summary.files_seen == 0
    finally:
        server.shutdown()


def test_no_identifier_in_any_output_and_no_dicom_on_disk(orthanc: Orthanc, credentials: Path, tmp_path: Path,
                                                          capsys, caplog, monkeypatch) -> None:
    ident = Identity(**NEEDLES)
    archive = build_archive(tmp_path / "written", ident)
    load(orthanc, archive, tmp_path / "files")
    uids = [ident.study_uid]
    for s in archive.series.values():
        uids += [s.series_uid, *s.sop_uids]
    needles = list(NEEDLES.values()) + ["Quixotic", "Zebulon"] + uids
    private_tmp = tmp_path / "tmpdir"
    private_tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(private_tmp))
    caplog.set_level(logging.DEBUG)
    out = tmp_path / "out" / "cache"
    argv = [orthanc.dicomweb, "--out", str(out), "--workers", "2", "--pacs-credentials", str(credentials)]
    assert main(argv) == 0
    assert main(argv) == 0  # a resumed run
    assert main([*argv, "--query", "Modality=CT"]) == 0  # a query: metadata of fewer series
    captured = capsys.readouterr()

    written = [p for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert any(p.suffix == ".npy" for p in written) and any(p.name == MANIFEST_NAME for p in written)
    for p in written:
        assert _haystack_hits(p.read_bytes(), needles) == [], p.name
    assert _haystack_hits(captured.out.encode() + captured.err.encode(), needles) == []
    assert _haystack_hits(caplog.text.encode(), needles) == []
    assert PASSWORD not in captured.out + captured.err + caplog.text
    # raw identified DICOM was decoded in memory: none on disk but the archive and Orthanc's own store
    assert dicom_files_under(tmp_path, skip=(tmp_path / "written", tmp_path / "files", orthanc.root)) == []
    assert list(private_tmp.iterdir()) == []


@pytest.mark.parametrize("status", [503, 429])
def test_retries_through_a_congested_network(orthanc: Orthanc, credentials: Path, tmp_path: Path,
                                             status: int) -> None:
    archive = build_archive(tmp_path / "written", hostile=False)
    load(orthanc, archive, tmp_path / "files")
    salt = tmp_path / "salt"
    prep_archive([tmp_path / "files"], tmp_path / "from_files", salt_file=salt, progress=False)
    proxy = FlakyProxy(orthanc.url, fail_every=3, status=status)
    try:
        source = open_source(proxy.spec(), credentials_file=credentials, backoff=0.01)
        summary = prep_archive([], tmp_path / "pulled", salt_file=salt, progress=False, source=source, workers=2)
    finally:
        proxy.close()
    assert proxy.failed >= 5  # the server really refused many requests...
    assert summary.rejects.get("pacs_retrieve_failed", 0) == 0  # ...and every one was retried
    assert cache_bytes(tmp_path / "pulled") == cache_bytes(tmp_path / "from_files")


def test_per_series_time_budget(orthanc: Orthanc, credentials: Path, tmp_path: Path, caplog) -> None:
    def scout_last(ds: pydicom.Dataset, k: int) -> None:  # a localizer inside the series: pulled slice by slice
        if k == 5:
            ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]

    big = volume_series(tmp_path / "a" / "ct", n=6, extra=scout_last)
    orthanc.upload_tree(tmp_path / "a")
    source = open_source(orthanc.dicomweb, credentials_file=credentials, rate=5, series_budget=0.3)
    summary = prep_archive([], tmp_path / "cache", progress=False, source=source)
    assert summary.series_in_manifest == 0
    assert summary.rejects == {"pacs_retrieve_failed": 5, "localizer": 1}
    assert "per-series time budget of 0.3 s is used up" in caplog.text
    again = prep_archive([], tmp_path / "cache", progress=False, source=open_source(
        orthanc.dicomweb, credentials_file=credentials))  # the next run, with time: pulled whole
    assert again.series_in_manifest == 1 and again.rejects == {"localizer": 1}
    retrievals = orthanc.retrievals()
    assert len(retrievals) >= 5 + 2  # slice by slice: a series holding a localizer is never pulled whole
    assert not any(big.sop_uids[5] in r or r.endswith(big.series_uid) for r in retrievals)


def test_fixture_fails_loudly_without_orthanc(tmp_path: Path, monkeypatch) -> None:
    """CI installs Orthanc; a machine without it must fail these tests, never skip them."""
    import tests.data_prep.orthanc as server_module

    monkeypatch.setattr(server_module, "ORTHANC_BINARY", "NoSuchOrthancBinary")
    with pytest.raises(pytest.fail.Exception, match="Orthanc is not installed"):
        Orthanc(tmp_path / "orthanc").start()


def test_a_series_whose_metadata_fails_is_counted_then_pulled_again(orthanc: Orthanc, credentials: Path,
                                                                     tmp_path: Path) -> None:
    volume_series(tmp_path / "a" / "ct", n=3)
    failing = volume_series(tmp_path / "a" / "mr", n=4, modality="MR", intercept=0, seed=1)
    orthanc.upload_tree(tmp_path / "a")

    def pull() -> object:
        return prep_archive([], tmp_path / "cache", progress=False, salt_file=tmp_path / "salt",
                            source=open_source(orthanc.dicomweb, credentials_file=credentials))

    assert pull().series_in_manifest == 2
    manifest = (tmp_path / "cache" / MANIFEST_NAME).read_bytes()
    orthanc.deny_file.write_text(f"/series/{failing.series_uid}/metadata\n")  # the server fails that request
    broken = pull()
    assert broken.rejects == {"pacs_retrieve_failed": 4}  # counted per instance: the server still lists them
    assert broken.series_in_manifest == 1  # the run goes on with the other series
    orthanc.deny_file.unlink()
    healed = pull()
    assert healed.rejects == {} and healed.series_in_manifest == 2
    assert (tmp_path / "cache" / MANIFEST_NAME).read_bytes() == manifest
