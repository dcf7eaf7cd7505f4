"""DICOMweb source: QIDO-RS to find series, WADO-RS metadata to judge them, WADO-RS retrieve (in
memory) for the instances of the series that pass.

Queries and metadata go through ``dicomweb-client``. Instances are fetched on the same session
(same TLS, credentials, retries and rate limit) as raw multipart parts: prep's bounded reader
(:func:`data_prep.streams.read_dicom`) must see the bytes exactly as a file would hold them, and
``dicomweb-client`` only hands out parsed datasets (``dcmread`` would inflate a deflated instance
without any budget). ``transfer-syntax=*`` asks for the stored syntax, so the server never transcodes
(a lossy recompression would change the pixels).
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from data_prep.reasons import Reason
from data_prep.scan import NON_IMAGE_MODALITIES, ScanRecord
from data_prep.sources.base import (
    DEFAULT_BACKOFF,
    DEFAULT_CONNECTIONS,
    DEFAULT_RATE,
    DEFAULT_RETRIES,
    DEFAULT_SERIES_BUDGET,
    DEFAULT_TIMEOUT,
    PacsError,
    PacsRefused,
    PacsUnreachable,
    RateLimiter,
    RetrieveFailed,
    Source,
    parse_locator,
)
from data_prep.sources.common import (
    Query,
    SeriesBudget,
    header_record,
    rejected_instances,
    series_failure,
)

log = logging.getLogger("data_prep")

_STUDY, _SERIES, _SOP, _MODALITY = "0020000D", "0020000E", "00080018", "00080060"
#: Library loggers that quote UIDs (``dicomweb_client`` logs every request's UIDs at INFO).
_CHATTY_LOGGERS = ("dicomweb_client", "urllib3")
_ACCEPT_DICOM = 'multipart/related; type="application/dicom"; transfer-syntax=*'
#: A series whose pixels (as declared by its headers) fit this is pulled in one WADO-RS request and
#: held in the build worker's memory; a larger one instance by instance.
WHOLE_SERIES_BYTES = 128 << 20


def _first(item: dict[str, Any], tag: str) -> str:
    value = item.get(tag, {}).get("Value") or [""]
    return str(value[0])


class DicomWebSource(Source):
    """``dicomweb+http(s)://[user@]host[:port]/path`` (the DICOMweb root of the server).

    Args:
        spec: the source as given on the command line (a password in it is refused).
        query: attribute filters and optional study/series UIDs.
        secret: ``user:password``, a password (user in the URL) or ``Bearer <token>``; None: no auth.
        ca_bundle: a CA certificate bundle for a private PKI; TLS is always verified.
        connections: build workers at most, each with one connection.
        rate: requests per second over the whole run.
        timeout: seconds per request; retries: further tries with exponential backoff after a timeout,
            a refused connection, 429 or 5xx (``Retry-After`` honoured); series_budget: seconds one
            series' retrieval may take in a worker.
    """

    def __init__(self, spec: str, query: Query, *, secret: str | None = None, ca_bundle: str | None = None,
                 connections: int = DEFAULT_CONNECTIONS, rate: float = DEFAULT_RATE,
                 timeout: float = DEFAULT_TIMEOUT, retries: int = DEFAULT_RETRIES,
                 backoff: float = DEFAULT_BACKOFF, series_budget: float = DEFAULT_SERIES_BUDGET) -> None:
        if not spec.startswith(("dicomweb+http://", "dicomweb+https://")):
            raise PacsError("a DICOMweb source starts with dicomweb+http:// or dicomweb+https://")
        parts = urlsplit(spec[len("dicomweb+"):])
        if parts.password is not None:
            raise PacsError("put no password in the source URL: use --pacs-credentials FILE or "
                            "$MEDMAE_PACS_CREDENTIALS")
        try:
            port = parts.port
        except ValueError:
            raise PacsError("the DICOMweb source's port is not a number from 1 to 65535") from None
        if not parts.hostname:
            raise PacsError("the DICOMweb source names no host")
        host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname  # IPv6
        netloc = host + (f":{port}" if port else "")
        self.url = urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))
        self.user = parts.username
        self.query = query
        self.connections = int(connections)
        self.timeout = float(timeout)
        self.retries = int(retries)
        self.backoff = float(backoff)
        self.ca_bundle = ca_bundle
        self._auth = self._auth_from(secret)
        self._limiter = RateLimiter(rate)
        self._budget = SeriesBudget(series_budget)
        self._pid = -1
        self._client: Any = None
        self._whole: dict[str, tuple[frozenset[str], int]] = {}  # series -> (its instances, pixel bytes)
        self._series_in_hand: str | None = None
        self._in_hand: dict[str, bytes] = {}  # SOP instance -> bytes, of the series being built
        for name in _CHATTY_LOGGERS:
            logging.getLogger(name).setLevel(logging.ERROR)

    def describe(self) -> str:
        return f"dicomweb+{self.url}"

    def _auth_from(self, secret: str | None) -> dict[str, Any]:
        if secret is None:
            if self.user:
                raise PacsError(f"{self.describe()}: user {self.user!r} given but no password "
                                "(--pacs-credentials FILE or $MEDMAE_PACS_CREDENTIALS)")
            return {}
        if secret.startswith("Bearer "):
            return {"headers": {"Authorization": secret}}
        if self.user:
            return {"auth": (self.user, secret)}
        user, sep, password = secret.partition(":")
        if not sep:
            raise PacsError(f"{self.describe()}: the credentials must be user:password or 'Bearer <token>' "
                            "(or put the user in the URL: dicomweb+https://user@host/...)")
        return {"auth": (user, password)}

    # -- connection (one per process; a forked worker opens its own)

    def client(self) -> Any:
        if self._client is None or self._pid != os.getpid():
            self._client = self._new_client()
            self._pid = os.getpid()
        return self._client

    def _new_client(self) -> Any:
        import requests
        from dicomweb_client.api import DICOMwebClient
        from requests.adapters import HTTPAdapter
        from urllib3.util.retry import Retry

        limiter = self._limiter

        class _Session(requests.Session):
            def request(self, *args: Any, **kwargs: Any) -> Any:  # every request, QIDO to retrieve
                limiter.wait()
                # per request: requests lets $REQUESTS_CA_BUNDLE override a session's CA bundle otherwise
                kwargs.setdefault("verify", self.verify)
                return super().request(*args, **kwargs)

        session = _Session()
        retry = Retry(total=self.retries, connect=self.retries, read=self.retries, status=self.retries,
                      backoff_factor=self.backoff, backoff_max=30, status_forcelist=(429, 500, 502, 503, 504),
                      allowed_methods=frozenset({"GET"}), respect_retry_after_header=True, raise_on_status=True)
        adapter = HTTPAdapter(pool_connections=1, pool_maxsize=1, max_retries=retry)
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        session.verify = self.ca_bundle if self.ca_bundle else True
        if "auth" in self._auth:
            session.auth = self._auth["auth"]
        session.headers.update(self._auth.get("headers", {}))
        client = DICOMwebClient(self.url, session=session, timeout=(self.timeout, self.timeout))
        client.set_http_retry_params(retry=False)  # the adapter retries (connections, 429/5xx, Retry-After)
        return client

    def close(self) -> None:
        if self._client is not None and self._pid == os.getpid():
            self._client._session.close()
        self._client = None

    def _failure(self, e: BaseException, doing: str) -> PacsError:
        """A one-line error naming the server and what was being done; no URL path (it holds UIDs)."""
        import requests

        response = getattr(e, "response", None)
        status = getattr(response, "status_code", None)
        if status in (401, 403):
            return PacsRefused(f"{self.describe()} refused the credentials while {doing} (HTTP {status})")
        if status is not None:
            return PacsRefused(f"{self.describe()} answered HTTP {status} while {doing}")
        if isinstance(e, requests.exceptions.RetryError):
            return PacsRefused(f"{self.describe()} kept answering with errors while {doing} "
                               f"({self.retries + 1} tries)")
        if isinstance(e, requests.exceptions.SSLError):
            return PacsUnreachable(f"{self.describe()}: TLS verification failed while {doing} "
                                   "(pass --pacs-ca-bundle for a private CA)")
        if isinstance(e, requests.exceptions.ConnectionError | requests.exceptions.Timeout):
            return PacsUnreachable(f"{self.describe()} is unreachable while {doing} "
                                   f"({e.__class__.__name__} after {self.retries + 1} tries)")
        return PacsRefused(f"{self.describe()}: {e.__class__.__name__} while {doing}")

    # -- metadata

    def _series(self) -> list[tuple[str, str, str]]:
        """``(study, series, modality)`` of every matching series, sorted, each once."""
        client = self.client()
        fields = ["StudyInstanceUID", "SeriesInstanceUID", "Modality"]
        searches = [dict(self.query.filters)]
        if self.query.uids:  # a UID may be a study's or a series': ask for both
            searches = [{**self.query.filters, key: uid} for uid in self.query.uids
                        for key in ("StudyInstanceUID", "SeriesInstanceUID")]
        found: dict[tuple[str, str], str] = {}
        for filters in searches:
            try:
                items = client.search_for_series(search_filters=filters, fields=fields, get_remaining=True)
            except Exception as e:  # noqa: BLE001 - becomes one line naming the server
                raise self._failure(e, "searching series (QIDO-RS)") from None
            for item in items:
                key = (_first(item, _STUDY), _first(item, _SERIES))
                if all(key):
                    found[key] = _first(item, _MODALITY).upper()
        return [(st, se, found[(st, se)]) for st, se in sorted(found)]

    def scan(self, *, max_voxels: int, allow_secondary: bool, on_progress: Callable[[int], None] | None = None
             ) -> list[ScanRecord]:
        from pydicom import Dataset

        client = self.client()
        records: list[ScanRecord] = []
        for study, series, modality in self._series():
            try:
                if modality in NON_IMAGE_MODALITIES:  # reports, RT, KO...: listed, never read
                    listed = client.search_for_instances(study, series, fields=["SOPInstanceUID"],
                                                         get_remaining=True)
                    batch = rejected_instances(study, series, [_first(i, _SOP) for i in listed],
                                               Reason.NON_IMAGE_SOP)
                else:
                    metadata = client.retrieve_series_metadata(study, series)
                    batch = [header_record(Dataset.from_json(m, bulk_data_uri_handler=_no_bulk_data),
                                           study, series, max_voxels, allow_secondary) for m in metadata]
                    self._note_whole(series, batch)
            except Exception as e:  # noqa: BLE001
                failure = self._failure(e, "reading a series' metadata")
                if isinstance(failure, PacsUnreachable):  # the server is gone: stop before anything is built
                    raise failure from None
                log.warning("%s", failure)  # this series' answer is bad: it is counted, the others go on
                batch = self._unread_series(study, series)
            records.extend(batch)
            if on_progress is not None:
                on_progress(len(batch))
        self.close()  # no connection of ours may be inherited by the build workers
        return records

    def _unread_series(self, study: str, series: str) -> list[ScanRecord]:
        """A series whose metadata failed: its instances counted ``pacs_retrieve_failed`` one by one when
        the server still lists them (so a cache entry built from them before is known to be still
        there), else one record standing for the whole series."""
        try:
            listed = self.client().search_for_instances(study, series, fields=["SOPInstanceUID"],
                                                        get_remaining=True)
        except Exception:  # noqa: BLE001 - the listing fails too: the series as a whole
            return [series_failure(study, series, Reason.PACS_RETRIEVE_FAILED)]
        sops = [s for s in (_first(i, _SOP) for i in listed) if s]
        if not sops:
            return [series_failure(study, series, Reason.PACS_RETRIEVE_FAILED)]
        return rejected_instances(study, series, sops, Reason.PACS_RETRIEVE_FAILED)

    # -- retrieval (build workers)

    def _note_whole(self, series: str, batch: list[ScanRecord]) -> None:
        """Remember a series every instance of which passed the header checks and whose pixels fit
        :data:`WHOLE_SERIES_BYTES`: it is pulled in one request (the server sends nothing refused)."""
        if not batch or any(r.dicom is None for r in batch):
            return
        size = sum(r.dicom.rows * r.dicom.columns * len(r.dicom.frames) * max(1, (r.dicom.bits_stored + 7) // 8)
                   for r in batch if r.dicom is not None)
        if size <= WHOLE_SERIES_BYTES:
            self._whole[series] = (frozenset(r.dicom.sop_instance for r in batch if r.dicom is not None), size)

    def retrieve(self, locator: str) -> bytes:
        study, series, sop = parse_locator(locator)
        self._budget.check(series)
        if series != self._series_in_hand:  # a worker builds one series at a time: drop the last one's
            self._series_in_hand, self._in_hand = series, {}
            if series in self._whole:
                self._in_hand = self._pull_series(study, series, *self._whole[series])
        data = self._in_hand.pop(sop, None)
        return data if data is not None else self._pull_instance(study, series, sop)

    def _pull_series(self, study: str, series: str, wanted: frozenset[str], size: int) -> dict[str, bytes]:
        """All instances of a series in one WADO-RS request (one request instead of one per slice),
        read under a byte budget; an instance missing from the answer is then pulled alone."""
        from data_prep.streams import read_dicom

        budget = size + (64 << 20) + (1 << 20) * len(wanted)  # pixels, plus headers and the multipart frame
        try:
            response = self.client()._session.get(f"{self.url}/studies/{study}/series/{series}", stream=True,
                                                  headers={"Accept": _ACCEPT_DICOM},
                                                  timeout=(self.timeout, self.timeout))
            response.raise_for_status()
            body = bytearray()
            for chunk in response.iter_content(1 << 20):
                body += chunk
                if len(body) > budget:
                    response.close()
                    raise RetrieveFailed(f"{self.describe()} sent more than the series' {budget} bytes")
        except RetrieveFailed:
            raise
        except Exception as e:  # noqa: BLE001
            failure = self._failure(e, "retrieving a series (WADO-RS)")
            raise RetrieveFailed(str(failure), "pacs_unreachable" if isinstance(failure, PacsUnreachable)
                                 else "pacs_retrieve_failed") from None
        found: dict[str, bytes] = {}
        for part in multipart_parts(response.headers.get("Content-Type", ""), body):
            try:
                ds = read_dicom(io.BytesIO(part), force=True, header_only=True).ds
                sop = str(ds.get("SOPInstanceUID", ""))
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException:  # noqa: BLE001 - a part we cannot even name: its instance is pulled alone
                continue
            if sop in wanted:
                found[sop] = bytes(part)
        return found

    def _pull_instance(self, study: str, series: str, sop: str) -> bytes:
        client = self.client()
        url = f"{self.url}/studies/{study}/series/{series}/instances/{sop}"
        try:
            response = client._session.get(url, headers={"Accept": _ACCEPT_DICOM},
                                           timeout=(self.timeout, self.timeout))
            response.raise_for_status()
        except Exception as e:  # noqa: BLE001
            failure = self._failure(e, "retrieving an instance (WADO-RS)")
            raise RetrieveFailed(str(failure), "pacs_unreachable" if isinstance(failure, PacsUnreachable)
                                 else "pacs_retrieve_failed") from None
        parts = multipart_parts(response.headers.get("Content-Type", ""), response.content)
        if len(parts) != 1:
            raise RetrieveFailed(f"{self.describe()} sent {len(parts)} parts for one instance")
        return parts[0]


def _no_bulk_data(uri: str) -> bytes:
    """Metadata never pulls bulk data (pixel data, large private blobs): only headers are judged."""
    return b""


def multipart_parts(content_type: str, body: bytes | bytearray) -> list[bytes | bytearray]:
    """The payloads of a ``multipart/related`` body (RFC 2046), or the body itself when not multipart.

    Raises:
        RetrieveFailed: a multipart body without its boundary.
    """
    if not content_type.lower().startswith("multipart/"):
        return [body]
    boundary = None
    for param in content_type.split(";")[1:]:
        key, _, value = param.strip().partition("=")
        if key.lower() == "boundary":
            boundary = value.strip().strip('"')
    if not boundary:
        raise RetrieveFailed("a multipart answer without a boundary")
    delimiter = b"--" + boundary.encode("ascii")
    parts = []
    for chunk in body.split(delimiter)[1:]:
        if chunk.startswith(b"--"):  # the closing delimiter
            break
        head, sep, payload = chunk.partition(b"\r\n\r\n")
        if not sep:
            raise RetrieveFailed("a multipart part without headers")
        if payload.endswith(b"\r\n"):  # the CRLF belongs to the next delimiter
            payload = payload[:-2]
        parts.append(payload)
    return parts
