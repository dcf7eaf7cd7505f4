from pathlib import Path

import lightning.pytorch as pl
import pytest
import timm
import torch

from medmae.export import export_checkpoint, export_encoder, load_card, load_timm_encoder
from medmae.models import create_mae
from medmae.train import MAEPretrainModule
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
    module = MAEPretrainModule(**TINY_MODEL, warmup_steps=0)
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
