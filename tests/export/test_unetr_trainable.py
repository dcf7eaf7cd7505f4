"""MONAI UNETR built by medmae trains under plain DDP: every trainable parameter gets a gradient.

DDP without ``find_unused_parameters`` fails at the end of the first step when a parameter that
requires a gradient never receives one. MONAI's ``TransformerBlock`` always builds cross-attention
parts that UNETR never calls; ``monai_unetr`` takes them out of training (they stay in the state dict).
"""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy

from medmae.data import CacheDataModule
from medmae.export import export_encoder
from medmae.export.unetr import monai_unetr
from medmae.export.unetr3d import build_unetr3d
from medmae.finetune.segment import SegmentationModule
from medmae.models import MaskedAutoencoder3D, create_mae

pytestmark = pytest.mark.usefixtures("one_thread")


def untouched(model: torch.nn.Module, x: torch.Tensor) -> list[str]:
    """Trainable parameters that one forward/backward leaves without a gradient."""
    model(x).square().mean().backward()
    return [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]


@pytest.mark.parametrize("cls_token", [True, False])
def test_2d_unetr_leaves_no_trainable_parameter_without_a_gradient(cls_token: bool) -> None:
    torch.manual_seed(0)
    model = monai_unetr(2, 1, 3, (32, 32), 48, 96, 2, 12, cls_token, feature_size=8)
    assert untouched(model, torch.randn(2, 1, 32, 32)) == []
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen and all(".cross_attn." in n or ".norm_cross_attn." in n for n in frozen)
    assert set(frozen) <= set(model.state_dict())  # still saved and loaded: old checkpoints keep fitting


def test_3d_unetr_from_a_pretrained_encoder_leaves_no_trainable_parameter_without_a_gradient() -> None:
    torch.manual_seed(0)
    mae = MaskedAutoencoder3D(img_size=(32, 32, 32), patch_size=16, embed_dim=48, depth=10, num_heads=2,
                              decoder_embed_dim=24, decoder_depth=1, decoder_num_heads=2)  # fmt: skip
    model = build_unetr3d(mae, (32, 32, 32), out_channels=2, feature_size=8)
    assert untouched(model, torch.randn(1, 1, 32, 32, 32)) == []


class _Planes(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(i)
        return {"image": torch.rand(1, 32, 32, generator=g), "label": torch.randint(0, 2, (1, 32, 32), generator=g)}


def test_unetr_fine_tuning_runs_under_plain_ddp(tmp_path: Path) -> None:
    """Two CPU processes, ``find_unused_parameters=False``: before the fix this stopped at step 2."""
    torch.manual_seed(0)
    mae = create_mae("mae_vit_tiny_patch16", img_size=32, patch_size=16, embed_dim=48, depth=10, num_heads=2,
                     decoder_depth=1, decoder_embed_dim=24, decoder_num_heads=2)  # fmt: skip
    export_encoder(mae, tmp_path / "encoder", CacheDataModule(str(tmp_path / "none"), img_size=32).preprocessing())
    module = SegmentationModule(f"medmae:{tmp_path / 'encoder'}", 2, decoder="unetr", feature_size=8)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    qkv = next(k for k in before if k.endswith("vit.blocks.0.attn.qkv.weight"))
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy=DDPStrategy(start_method="spawn", find_unused_parameters=False),
        max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(_Planes(), batch_size=1))
    assert torch.isfinite(trainer.callback_metrics["train/loss"])  # rank 0 trained (its step count stays there)
    after = module.state_dict()  # rank 0's weights, copied back by ddp_spawn
    assert not torch.equal(*(d[qkv] for d in (before, after)))
    frozen = [k for k in before if "cross_attn" in k]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)


def test_a_unetr_run_saved_before_the_freeze_resumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A checkpoint whose optimizer still held the cross-attention norms (medmae before 2026-12-07)."""
    import medmae.export.unetr as unetr

    torch.manual_seed(0)
    mae = create_mae("mae_vit_tiny_patch16", img_size=32, patch_size=16, embed_dim=48, depth=10, num_heads=2,
                     decoder_depth=1, decoder_embed_dim=24, decoder_num_heads=2)  # fmt: skip
    export_encoder(mae, tmp_path / "encoder", CacheDataModule(str(tmp_path / "none"), img_size=32).preprocessing())
    loader = torch.utils.data.DataLoader(_Planes(), batch_size=2)

    def trainer(steps: int) -> pl.Trainer:
        return pl.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_progress_bar=False,
                          enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path,
                          enable_checkpointing=False)  # fmt: skip

    with monkeypatch.context() as old:
        old.setattr(unetr, "freeze_cross_attention", lambda model: None)
        before = SegmentationModule(f"medmae:{tmp_path / 'encoder'}", 2, decoder="unetr", feature_size=8)
        assert all(p.requires_grad for p in before.parameters())  # the old build
        run = trainer(2)
        run.fit(before, train_dataloaders=loader)
        run.save_checkpoint(tmp_path / "old.ckpt")
    saved = torch.load(tmp_path / "old.ckpt", weights_only=False)["optimizer_states"][0]
    n_params = sum(1 for _ in before.net.parameters())
    assert sum(len(g["params"]) for g in saved["param_groups"]) == n_params  # the norms were in the optimizer

    now = SegmentationModule(f"medmae:{tmp_path / 'encoder'}", 2, decoder="unetr", feature_size=8)
    resumed = trainer(3)
    resumed.fit(now, train_dataloaders=loader, ckpt_path=tmp_path / "old.ckpt")
    assert resumed.global_step == 3
    state = resumed.optimizers[0].state_dict()
    names = [n for g in now._groups() for n in g["names"]]  # the current groups, in the optimizer's order
    assert sum(len(g["params"]) for g in state["param_groups"]) == len(names) < n_params
    assert not any("cross_attn" in n for n in names)
    # every kept moment is the saved one carried one step on (a fresh one would count 1 step)
    assert {float(s["step"]) for s in state["state"].values()} == {3.0}
