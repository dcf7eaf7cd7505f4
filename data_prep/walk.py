"""Walk the archives and sniff which files are DICOM.

:func:`walk` lists every entry below the archives (folders it does not enter are reported, not
dropped); :func:`sniff_dicom` recognises DICOM by content (preamble ``DICM`` or a plausible first
data element), not by extension. Reading the headers is :mod:`data_prep.scan`'s job.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from data_prep.reasons import Reason

_VRS = frozenset(
    b"AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL UN UR US UT UV".split()
)


def walk(
    archives: Sequence[Path], exclude: Iterable[Path] = (), *, follow_links: bool = False
) -> Iterator[tuple[str, str, Reason | None]]:
    """Yield ``(path, rel, folder_reason)`` for every entry below the archives, sorted per folder.

    ``folder_reason`` is None for a file (regular or not: FIFOs, devices and broken links are files
    here, :func:`~data_prep.scan.scan_file` classifies them). A folder stands for everything inside it and is
    yielded once with a reason instead of vanishing:

    * ``unreadable_directory``: it cannot be listed (its contents are then unknown);
    * ``directory_link``: a symbolic link to a folder that is not followed. A link whose target lies
      inside a declared archive is never followed (the target is scanned under its own path, once);
      a link leading out of the archives is followed only with ``follow_links``; a folder already
      entered (a link loop, a second link to one place) is never entered twice.

    ``exclude`` (the cache itself, say) is pruned silently.
    """
    excluded = {os.path.realpath(p) for p in exclude}
    roots = [os.path.realpath(a) for a in archives]
    visited: set[tuple[int, int]] = set()  # (device, inode) of every folder entered, across archives

    def inside_an_archive(real: str) -> bool:
        return any(real == r or real.startswith(r.rstrip(os.sep) + os.sep) for r in roots)

    for index, root in enumerate(archives):
        root = os.fspath(root)
        try:
            st = os.stat(root)
            visited.add((st.st_dev, st.st_ino))
        except OSError:
            pass
        stack = [root]
        while stack:
            dirpath = stack.pop()
            try:
                with os.scandir(dirpath) as it:
                    entries = sorted(it, key=lambda e: e.name)
            except OSError:
                yield dirpath, _rel(dirpath, root, index), Reason.UNREADABLE_DIRECTORY
                continue
            real_dir = os.path.realpath(dirpath)  # once per folder, not per file
            subdirs: list[str] = []
            for entry in entries:
                if os.path.join(real_dir, entry.name) in excluded:
                    continue
                try:
                    is_link = entry.is_symlink()
                    is_dir = entry.is_dir()  # follows links; False for a broken one
                except OSError:
                    is_link, is_dir = False, False
                if not is_dir:
                    yield entry.path, _rel(entry.path, root, index), None
                    continue
                target = os.path.realpath(entry.path)
                if target in excluded:
                    continue
                try:
                    st = os.stat(entry.path)
                    key = (st.st_dev, st.st_ino)
                except OSError:
                    yield entry.path, _rel(entry.path, root, index), Reason.UNREADABLE_DIRECTORY
                    continue
                if is_link and (inside_an_archive(target) or not follow_links):
                    yield entry.path, _rel(entry.path, root, index), Reason.DIRECTORY_LINK
                    continue
                if key in visited:  # a loop, or a second way into a folder already scanned
                    yield entry.path, _rel(entry.path, root, index), Reason.DIRECTORY_LINK
                    continue
                visited.add(key)
                subdirs.append(entry.path)
            stack.extend(reversed(subdirs))  # depth first, in name order


def _rel(path: str, root: str, index: int) -> str:
    return f"{index}/{os.path.relpath(path, root)}"


def sniff_dicom(head: bytes) -> str | None:
    """``"part10"`` (preamble + DICM), ``"raw"`` (a bare dataset, no preamble/meta) or None.

    A bare dataset must start with a group 0002/0008 element in either byte order with an
    explicit VR or a small implicit length; this keeps ``force=True`` away from random files.
    """
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "part10"
    if len(head) < 8:
        return None
    for order in ("little", "big"):
        group = int.from_bytes(head[0:2], order)  # type: ignore[arg-type]
        if group not in (0x0002, 0x0008):
            continue
        if head[4:6] in _VRS:
            return "raw"
        if int.from_bytes(head[4:8], order) < 0x10000:  # type: ignore[arg-type]
            return "raw"
    return None
