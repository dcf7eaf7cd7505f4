"""Two-process DDP on CPU (gloo, ``find_unused_parameters=False``: every parameter gets a gradient):
a non-finite loss on one rank makes *every* rank skip the update, with no extra collective."""

import copy
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import DDPStrategy

from medmae.train import MAEPretrainModule
from tests.train.conftest import TensorDataModule, smooth_images


def test_nonfinite_loss_on_one_rank_skips_the_step_on_all_ranks(tmp_path: Path, tiny_model_kwargs: dict) -> None:
    images = smooth_images(4)
    images[1, 0, 3, 3] = float("nan")  # the distributed sampler hands sample 1 to rank 1 only
    module = MAEPretrainModule(**tiny_model_kwargs, optim={"lr": 1e-2, "warmup_steps": 0})
    before = copy.deepcopy(module.model.state_dict())
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=DDPStrategy(start_method="spawn", find_unused_parameters=False),
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, datamodule=TensorDataModule(images, batch_size=1))
    assert trainer.callback_metrics["train/skipped_steps"].item() == 1.0  # rank 0's own loss was finite
    after = module.model.state_dict()  # rank 0's weights, copied back by ddp_spawn
    assert all(torch.equal(before[k], after[k]) for k in before)
