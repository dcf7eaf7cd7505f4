from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import timm
import torch

import medmae
from medmae.data import CacheDataModule, IntensityOptions, SamplingOptions, SelectionOptions
from medmae.data.cache import load_manifest
from medmae.export import export_checkpoint, export_encoder, load_card, load_timm_encoder, preprocessing_from_card
from medmae.models import create_mae
from medmae.train import MAEPretrainModule
from tests.data.conftest import noise_volume
from tests.train.conftest import TINY_MODEL, TensorDataModule, smooth_images


def test_exported_weights_load_strictly_into_timm_and_match_features(tmp_path: Path) -> None:
    mae = create_mae("mae_vit_tiny_patch16", in_chans=3, img_size=(32, 48), depth=2, decoder_depth=1).eval()
    export_encoder(mae, tmp_path, preprocessing={"axis": "axial", "slices": 3})
    card = load_card(tmp_path)
    assert card["encoder"]["arch"] == "vit_tiny_patch16_224" and card["encoder"]["in_chans"] == 3
    assert card["preprocessing"] == {"axis": "axial", "slices": 3}
    vit = load_timm_encoder(tmp_path).eval()
    x = torch.randn(2, 3, 32, 48)
    torch.testing.assert_close(vit.forward_features(x), mae.forward_encoder(x, 0.0)[0], rtol=0, atol=1e-6)
    classifier = load_timm_encoder(tmp_path, num_classes=5)
    assert classifier(x).shape == (2, 5)


def test_wrong_architecture_is_refused(tmp_path: Path) -> None:
    export_encoder(create_mae("mae_vit_tiny_patch16", depth=2, decoder_depth=1, img_size=32), tmp_path)
    with pytest.raises(ValueError, match="does not match"):
        load_timm_encoder(tmp_path, depth=3)


def test_export_from_checkpoint_keeps_training_facts(tmp_path: Path) -> None:
    module = MAEPretrainModule(**TINY_MODEL, optim={"warmup_steps": 0})
    trainer = pl.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=TensorDataModule(smooth_images(4), batch_size=2))
    ckpt = tmp_path / "mae.ckpt"
    trainer.save_checkpoint(ckpt)
    export_checkpoint(ckpt, tmp_path / "export")
    card = load_card(tmp_path / "export")
    assert card["pretraining"]["global_step"] == 2 and card["pretraining"]["mask_ratio"] == 0.75
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=0, in_chans=1, img_size=64, patch_size=8, depth=4)
    vit.load_state_dict(load_timm_encoder(tmp_path / "export").state_dict(), strict=True)
    assert torch.equal(vit.patch_embed.proj.weight, module.model.encoder.patch_embed.proj.weight)


def test_card_names_the_versions_that_exported_it(tmp_path: Path) -> None:
    export_encoder(create_mae("mae_vit_tiny_patch16", depth=2, decoder_depth=1, img_size=32), tmp_path)
    versions = load_card(tmp_path)["versions"]
    assert versions["timm"] == timm.__version__ and versions["medmae"] == medmae.__version__
    assert versions["torch"] == torch.__version__.split("+")[0]


def test_exporting_the_same_weights_twice_gives_the_same_bytes(tmp_path: Path) -> None:
    # a reproducible run must give a byte-identical export (checksums, dedup, "is this the same encoder?")
    mae = create_mae("mae_vit_tiny_patch16", depth=2, decoder_depth=1, img_size=32)
    names = ("encoder.safetensors", "encoder.json")
    exports = []
    for i in range(8):  # the unordered safetensors metadata map differed in about half of the writes
        export_encoder(mae, tmp_path / str(i), preprocessing={"axis": "axial"}, training={"global_step": 3})
        exports.append([(tmp_path / str(i) / name).read_bytes() for name in names])
    assert all(e == exports[0] for e in exports[1:])


def test_exported_card_carries_the_training_data_and_no_pseudonymous_id(tmp_path: Path, cache_builder) -> None:
    """checkpoint -> export, the path the preprocessing record takes: counts of what was trained on."""
    for i, patient in enumerate(("pat0a9f3e1c", "pat0a9f3e1c", "pat1b8e2d0b")):
        cache_builder.add(f"ser{i}c4d51f7e", noise_volume(i, (6, 64, 64)), patient_id=patient)
    mr = np.random.default_rng(3).integers(0, 900, (4, 64, 64)).astype(np.int16)
    cache_builder.add("ser3c4d51f7e", mr, modality="MR", source="nifti", patient_id="pat2c7d1c9a")
    cache_builder.add("ser4c4d51f7e", noise_volume(4, (6, 8, 8)), patient_id="pat3d6c0b8f")  # below min_size
    cache_builder.add("ser5c4d51f7e", noise_volume(5, (6, 64, 64)), split="val", patient_id="pat4e5b9a7e")
    cache = cache_builder.write()
    dm = CacheDataModule(str(cache), img_size=64, batch_size=2, num_workers=0,
                         sampling=SamplingOptions(samples_per_epoch=2), selection=SelectionOptions(min_size=32),
                         intensity=IntensityOptions(ct_inference_window=2))
    module = MAEPretrainModule(**TINY_MODEL, optim={"warmup_steps": 0})
    trainer = pl.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=dm)
    ckpt = tmp_path / "mae.ckpt"
    trainer.save_checkpoint(ckpt)
    export_checkpoint(ckpt, tmp_path / "export")
    card = load_card(tmp_path / "export")
    data = card["preprocessing"]["training_data"]
    assert (data["series"], data["slices"], data["patients"]) == (4, 22, 3)
    assert data["by_modality"] == {"CT": {"series": 3, "slices": 18, "patients": 2},
                                   "MR": {"series": 1, "slices": 4, "patients": 1}}
    assert data["by_source"]["nifti"] == {"series": 1, "slices": 4, "patients": 1}
    assert data["by_kind"] == {"volume": {"series": 4, "slices": 22, "patients": 3}}
    assert data["dropped"] == {"min_size": 1}
    assert card["preprocessing"]["intensity"]["ct"]["inference_window"] == 2
    assert preprocessing_from_card(card).inference_window == 2
    assert set(card["versions"]) >= {"medmae", "timm", "torch"}
    everything = "".join(p.read_text(errors="ignore") for p in (tmp_path / "export").iterdir())
    for row in load_manifest(cache).rows:
        assert row.series_id not in everything and row.patient_id not in everything
