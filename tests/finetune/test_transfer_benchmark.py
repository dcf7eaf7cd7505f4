"""benchmarks/transfer.py end to end in its reduced mode (slow: it pretrains and fine-tunes 2 models)."""

import hashlib
import importlib.util
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from data_prep import prep_archive
from medmae.data.cache import load_manifest, open_series_array

ROOT = Path(__file__).resolve().parents[2]


def plane_hashes(cache: Path) -> list[str]:
    """A hash of every plane (``array[z]`` of the cache's (Z, Y, X) arrays) of every series in a cache.

    Values are hashed as float64, so a plane stored as int16 in one series and uint8 in another still
    matches itself.
    """
    out = []
    for row in load_manifest(cache).rows:
        array = open_series_array(cache, row)
        for z in range(array.shape[0]):
            plane = np.asarray(array[z], dtype=np.float64)
            out.append(hashlib.sha256(repr(plane.shape).encode() + plane.tobytes()).hexdigest())
    return out


def prepped_planes(images: list[Path], work: Path) -> list[str]:
    """Plane hashes of NIfTI files put through the same ``prep_archive`` as the pretraining archive."""
    folder = work / "archive"
    folder.mkdir(parents=True)
    for image in images:
        shutil.copy(image, folder / image.name)
    prep_archive([folder], work / "cache", workers=1, salt_file=work / "salt", val_fraction=0.0, progress=False)
    return plane_hashes(work / "cache")


def import_transfer(need_nilearn: bool = True):  # noqa: ANN201 - the benchmark module
    """benchmarks/transfer.py as a module (its folder is not a package); with ``need_nilearn`` a missing
    nilearn fails the test with the install command instead of an import error deep in the run."""
    if need_nilearn and importlib.util.find_spec("nilearn") is None:
        pytest.fail('the transfer benchmark needs nilearn\'s MNI152 files: pip install -e ".[transfer]"')
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import transfer
    finally:
        sys.path.pop(0)
    return transfer


@pytest.mark.slow
def test_transfer_benchmark_quick_mode_runs_the_whole_path(tmp_path: Path) -> None:
    transfer = import_transfer()
    out = tmp_path / "result.json"
    log = tmp_path / "looks.jsonl"
    args = ["--quick", "--seeds", "0", "--work", str(tmp_path / "work"), "--json", str(out)]
    assert transfer.main([*args, "--final-test", "--test-log", str(log)]) == 0
    report = json.loads(out.read_text())
    assert report["labelled_slabs"] <= 5 and report["test_slabs"] >= 3
    for init in ("medmae", "random", "random-sincos"):
        (only,) = report["per_seed"][init]
        assert 0.0 < only["test"] <= 1.0 and 0.0 < only["val"] <= 1.0
    (look,) = [json.loads(line) for line in log.read_text().splitlines()]
    assert look["per_seed"] == report["per_seed"] and look["summary"] == report["test"]
    # the recipe pretrains with data.augment on, and the export's record says so (fine-tuning ignores it)
    augment = json.loads((tmp_path / "work" / "encoder" / "encoder.json").read_text())["preprocessing"]["augment"]
    assert augment["rotate_deg"] == report["recipe"]["aug_rotate_deg"] == transfer.Recipe().aug_rotate_deg > 0
    assert augment["scale"] == list(transfer.Recipe().aug_scale)
    assert augment["bias_field"] == report["recipe"]["aug_bias_field"]
    # the pretraining cache never held a test or a validation plane (validation stands in for test):
    # every plane the pretraining read, hashed, against every plane of those slabs read through the same
    # prep; the labelled training slabs (which pretraining does see) show the comparison can find a plane
    work = tmp_path / "work"
    pretraining = set(plane_hashes(work / "cache"))
    roles = ("test", "val", "train")
    slabs = {role: sorted((work / "labelled").glob(f"{role}_[0-9][0-9].nii.gz")) for role in roles}
    assert len(slabs["test"]) == report["test_slabs"] and len(slabs["val"]) == report["val_slabs"]
    planes = {role: prepped_planes(slabs[role], tmp_path / f"{role}_prep") for role in roles}
    for role in ("test", "val"):
        assert len(set(planes[role])) == len(planes[role]) == report[f"{role}_slabs"] * transfer.Recipe().slab
        assert not pretraining & set(planes[role]), role
    assert set(planes["train"]) <= pretraining and len(planes["train"]) == report["labelled_slabs"] * 8


def test_report_with_a_given_encoder_does_not_claim_pretraining_settings() -> None:
    transfer = import_transfer(need_nilearn=False)
    own = transfer.recipe_record(transfer.Recipe(), None)
    given = transfer.recipe_record(transfer.Recipe(), Path("/runs/enc"))
    assert own["mask_ratio"] == transfer.Recipe().mask_ratio and "pretraining" not in own
    assert not set(transfer.PRETRAIN_FIELDS) & set(given) and given["layer_decay"] == own["layer_decay"]
    assert "encoder.json" in given["pretraining"]


def test_split_block_1_is_the_interleaved_split_and_3_holds_out_contiguous_blocks() -> None:
    transfer = import_transfer(need_nilearn=False)
    n = 19  # the MNI brain's axial range in slabs of 8 planes
    interleaved = [transfer.slab_role(i, 1) for i in range(n)]
    assert interleaved == [("pool", "test", "pool", "val")[i % 4] for i in range(n)]
    blocks = [transfer.slab_role(i, 3) for i in range(n)]
    assert blocks[:12] == ["pool"] * 3 + ["test"] * 3 + ["pool"] * 3 + ["val"] * 3
    test = [i for i, role in enumerate(blocks) if role == "test"]
    # each held-out block is contiguous and its middle slab has no pool slab next to it
    assert test == [3, 4, 5, 15, 16, 17]
    assert all(blocks[i - 1] == blocks[i + 1] == "test" for i in (4, 16))
    with pytest.raises(ValueError, match="split-block"):
        transfer.slab_role(0, 0)


@pytest.mark.slow
def test_transfer_benchmark_pretrains_2p5d_with_a_hog_target_and_fine_tunes_from_the_card(tmp_path: Path) -> None:
    """``--slices 3 --hog-weight 0.5``: the export's card says 3 planes and 3 input channels, and fine-tuning
    rebuilds that input from the card (a wrong channel count would fail to load or to run)."""
    transfer = import_transfer()
    out, work = tmp_path / "result.json", tmp_path / "work"
    args = ["--quick", "--seeds", "0", "--inits", "medmae", "--slices", "3", "--hog-weight", "0.5"]
    assert transfer.main([*args, "--work", str(work), "--json", str(out)]) == 0
    card = json.loads((work / "encoder" / "encoder.json").read_text())
    assert card["preprocessing"]["slices"] == 3 and card["encoder"]["in_chans"] == 3
    report = json.loads(out.read_text())
    assert report["recipe"]["slices"] == 3 and report["recipe"]["hog_weight"] == 0.5
    assert 0.0 < report["per_seed"]["medmae"][0]["val"] <= 1.0
