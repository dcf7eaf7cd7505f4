"""Issue 8.9: ``--path-map`` is valid UTF-8 JSON even for file and folder names that are not UTF-8;
the exact bytes of such names come back through ``raw_paths``."""

from __future__ import annotations

import json
import os
from pathlib import Path

from data_prep.cli import main
from tests.data_prep.factory import volume_series


def test_path_map_is_utf8_json_for_non_utf8_names(tmp_path: Path, capsys) -> None:
    a = tmp_path / "archive"
    s = volume_series(a / "ct", n=2)
    odd_dir = os.fsencode(a) + b"/caf\xe9"  # Latin-1 folder name
    os.mkdir(odd_dir)
    odd_file = odd_dir + b"/scan\xff\xfe"  # and a file name that no encoding decodes
    os.rename(s.paths[1], odd_file)
    with open(os.fsencode(a) + b"/notes\x80.txt", "wb") as f:
        f.write(b"not an image" * 10)
    path_map = tmp_path / "map.json"

    assert main([str(a), "--out", str(tmp_path / "cache"), "--path-map", str(path_map), "--quiet"]) == 0
    capsys.readouterr()
    blob = path_map.read_bytes()
    doc = json.loads(blob.decode("utf-8"))  # strict: any invalid byte would raise here
    raw = {fid: bytes.fromhex(h) for fid, h in doc["raw_paths"].items()}
    assert sorted(raw.values()) == sorted([odd_file, os.fsencode(a) + b"/notes\x80.txt"])
    for fid, value in raw.items():  # the text form shows the odd bytes escaped
        assert doc["files"][fid] == value.decode("utf-8", "backslashreplace")
    assert doc["files"][next(f for f, v in raw.items() if v == odd_file)].endswith("caf\\xe9/scan\\xff\\xfe")
    # the odd file is in the built series next to its neighbour; the UTF-8 names are plain text
    odd_id = next(f for f, v in raw.items() if v == odd_file)
    plain_id = next(f for f, v in doc["files"].items() if v == str(s.paths[0]))
    assert list(doc["series"].values()) == [sorted([odd_id, plain_id])]


def test_summary_prints_non_utf8_cache_paths(tmp_path: Path, capsys) -> None:
    a = tmp_path / "archive"
    volume_series(a / "ct", n=2)
    out = os.fsdecode(os.fsencode(tmp_path) + b"/cache\xff")
    assert main([str(a), "--out", out, "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "cache\\xff" in printed
