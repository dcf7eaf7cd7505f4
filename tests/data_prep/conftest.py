"""Shared helpers: run prep into a temporary cache and look results up by *source path*.

Lookups go through the ``--path-map`` file (pseudonym -> path), which is exactly what a hospital
would use, so tests never need to know how pseudonyms are computed.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from data_prep import PrepSummary, prep_archive
from medmae.data.cache import REJECT_REPORT_NAME, Manifest, ManifestRow, load_manifest, open_series_array


@dataclass
class PrepRun:
    out: Path
    summary: PrepSummary
    manifest: Manifest
    report: dict
    path_map: dict

    def _fid(self, path: Path) -> str:
        want = os.path.abspath(path)
        for fid, p in self.path_map["files"].items():
            if p == want:
                return fid
        raise KeyError(f"{path} not in the path map (not scanned?)")

    def reason(self, path: Path) -> str | None:
        """Reject reason of a file, or None if it is part of a built series."""
        fid = self._fid(path)
        for entry in self.report["rejected"]:
            if entry["id"] == fid:
                return entry["reason"]
        return None

    def row(self, path: Path) -> ManifestRow:
        """The manifest row of the series a (kept) file belongs to."""
        fid = self._fid(path)
        sids = [sid for sid, files in self.path_map["series"].items() if fid in files]
        rows = [r for r in self.manifest.rows if r.series_id in sids]
        assert len(rows) == 1, f"{path}: in {len(rows)} built series"
        assert self.reason(path) is None, f"{path}: built but also rejected ({self.reason(path)})"
        return rows[0]

    def array(self, path: Path) -> np.ndarray:
        return np.asarray(open_series_array(self.out, self.row(path)))

    def files_of(self, row: ManifestRow) -> list[str]:
        return sorted(self.path_map["files"][f] for f in self.path_map["series"][row.series_id])


def run_prep(archives: list[Path] | Path, out: Path, **kwargs) -> PrepRun:
    archives = [archives] if isinstance(archives, Path) else archives
    map_path = out.parent / f"{out.name}.paths.json"
    kwargs.setdefault("progress", False)
    summary = prep_archive(archives, out, path_map=map_path, **kwargs)
    return PrepRun(
        out=out,
        summary=summary,
        manifest=load_manifest(out),
        report=json.loads((out / REJECT_REPORT_NAME).read_text()),
        path_map=json.loads(map_path.read_text()),
    )


@pytest.fixture
def prep(tmp_path: Path):
    """``prep(archive, **kw)`` -> PrepRun with its cache under tmp_path."""
    counter = iter(range(1000))

    def _run(archives, **kwargs) -> PrepRun:
        return run_prep(archives, tmp_path / f"cache{next(counter)}", **kwargs)

    return _run
