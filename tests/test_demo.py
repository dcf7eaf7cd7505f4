"""`medmae demo` end to end (short form), and a PHI canary over everything it writes."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from medmae.demo import main, sample_archives
from medmae.export import load_timm_encoder
from medmae.train import MAEPretrainModule

PHI_KEYWORDS = (
    "PatientName", "PatientID", "PatientBirthDate", "StudyDate", "SeriesDate", "AcquisitionDate",
    "ContentDate", "AccessionNumber", "InstitutionName", "InstitutionAddress", "StationName",
    "ReferringPhysicianName", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "StudyID",
)


def _identifying_strings() -> set[str]:
    """Every identifying header value of the sample DICOM files, plus the archive paths."""
    found: set[str] = set()
    for root in sample_archives():
        found.add(str(root))
        for path in root.rglob("*"):
            if not path.is_file():
                continue
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
            except Exception:  # junk files are part of the samples
                continue
            for keyword in PHI_KEYWORDS:
                value = str(ds.get(keyword, "") or "").strip()
                if _distinctive(value):
                    found.add(value)
    return found


def _distinctive(value: str) -> bool:
    """Values like "1", "000000000" or "12345678" occur by chance in any output (a gradient image's bytes)."""
    return len(value) >= 6 and len(set(value)) >= 4 and value not in "0123456789"


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    work = tmp_path_factory.mktemp("demo")
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["--workdir", str(work), "--steps", "6", "--workers", "1", "--quiet"]) == 0
    return work, out.getvalue()


def test_demo_leaves_log_with_reconstruction_checkpoint_png_and_encoder(demo_run: tuple[Path, str]) -> None:
    work, stdout = demo_run
    assert "tensorboard --logdir" in stdout and "reconstruction.png" in stdout
    events = list((work / "runs").rglob("events.out.tfevents.*"))
    assert events
    acc = EventAccumulator(str(events[0].parent), size_guidance={"images": 0}).Reload()
    assert acc.Images("train/reconstruction")
    assert "train/loss" in acc.Tags()["scalars"]
    module = MAEPretrainModule.load_from_checkpoint(work / "checkpoints" / "last.ckpt", map_location="cpu")
    assert module.model.in_chans == 1
    png = work / "reconstruction.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    vit = load_timm_encoder(work / "encoder")
    assert vit.patch_embed.proj.weight.shape[1] == 1


def test_no_identifying_value_of_the_samples_reaches_any_demo_output(demo_run: tuple[Path, str]) -> None:
    work, stdout = demo_run
    canaries = _identifying_strings()
    assert len(canaries) > 20  # the samples do carry names, dates, UIDs and institutions
    needles = [(c, c.encode("utf-8")) for c in canaries] + [(c, c.encode("utf-16-le")) for c in canaries]
    leaks = []
    for path in work.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            leaks += [f"{path.relative_to(work)}: {c!r}" for c, needle in needles if needle in data]
    leaks += [f"stdout: {c!r}" for c in canaries if c in stdout]
    assert leaks == []
