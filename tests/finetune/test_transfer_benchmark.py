"""benchmarks/transfer.py end to end in its reduced mode (slow: it pretrains and fine-tunes 2 models)."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_transfer_benchmark_quick_mode_runs_the_whole_path(tmp_path: Path) -> None:
    if importlib.util.find_spec("nilearn") is None:
        pytest.fail('the transfer benchmark needs nilearn\'s MNI152 files: pip install -e ".[transfer]"')
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import transfer
    finally:
        sys.path.pop(0)
    out = tmp_path / "result.json"
    assert transfer.main(["--quick", "--seeds", "0", "--work", str(tmp_path / "work"), "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["labelled_slabs"] <= 5 and report["test_slabs"] >= 3
    for init in ("medmae", "random"):
        (only,) = report["per_seed"][init]
        assert 0.0 < only["test"] <= 1.0 and 0.0 < only["val"] <= 1.0
    # the pretraining archive never held a test plane
    assert not any("test" in p.name for p in (tmp_path / "work" / "unlabelled").iterdir())


def test_report_with_a_given_encoder_does_not_claim_pretraining_settings() -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import transfer
    finally:
        sys.path.pop(0)
    own = transfer.recipe_record(transfer.Recipe(), None)
    given = transfer.recipe_record(transfer.Recipe(), Path("/runs/enc"))
    assert own["mask_ratio"] == transfer.Recipe().mask_ratio and "pretraining" not in own
    assert not set(transfer.PRETRAIN_FIELDS) & set(given) and given["layer_decay"] == own["layer_decay"]
    assert "encoder.json" in given["pretraining"]
