import copy
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from medmae.models import random_masking
from medmae.train import MAEPretrainModule, weight_decay_groups
from medmae.train.callbacks import TITLE_HEIGHT
from medmae.train.module import mask_seed
from tests.train.conftest import TensorDataModule, smooth_images


def trainer(tmp_path: Path, **kw) -> pl.Trainer:
    defaults = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=tmp_path,
    )
    defaults.update(kw)
    return pl.Trainer(**defaults)


class LossRecorder(Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def test_weight_decay_groups_exclude_bias_norm_positions_tokens(tiny_model_kwargs: dict) -> None:
    module = MAEPretrainModule(**tiny_model_kwargs)
    decay, no_decay = weight_decay_groups(module.model.named_parameters(), 0.05)
    names = {id(p): n for n, p in module.model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    decay_names = {names[id(p)] for p in decay["params"]}
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert {"encoder.cls_token", "mask_token", "encoder.norm.weight", "decoder_norm.bias"} <= no_decay_names
    assert "encoder.pos_embed" not in no_decay_names | decay_names  # frozen sin-cos
    assert all(n.endswith("weight") and "norm" not in n for n in decay_names)
    assert "encoder.blocks.0.attn.qkv.weight" in decay_names


def test_overfits_one_fixed_batch(tmp_path: Path, tiny_model_kwargs: dict) -> None:
    torch.manual_seed(0)
    module = MAEPretrainModule(**tiny_model_kwargs, optim={"lr": 1e-3, "warmup_steps": 0})
    data = TensorDataModule(smooth_images(8), batch_size=8)
    rec = LossRecorder()
    trainer(tmp_path, max_steps=50, callbacks=[rec]).fit(module, datamodule=data)
    assert len(rec.losses) == 50
    assert min(rec.losses[-5:]) <= 0.5 * rec.losses[0]


def test_lr_is_scaled_by_effective_batch(tmp_path: Path, tiny_model_kwargs: dict) -> None:
    module = MAEPretrainModule(**tiny_model_kwargs, optim={"blr": 1e-3, "warmup_steps": 0, "min_lr": 1e-3})
    data = TensorDataModule(smooth_images(8), batch_size=4)
    trainer(tmp_path, max_steps=2, accumulate_grad_batches=2).fit(module, datamodule=data)
    assert module.effective_batch_size == 8
    assert module.optimizers().param_groups[0]["lr"] == pytest.approx(1e-3 * 8 / 256)


def test_nonfinite_loss_leaves_weights_unchanged_and_is_counted(tmp_path: Path, tiny_model_kwargs: dict) -> None:
    images = smooth_images(4)
    images[1, 0, 5, 5] = float("nan")
    module = MAEPretrainModule(**tiny_model_kwargs, optim={"lr": 1e-2, "warmup_steps": 0})
    before = copy.deepcopy(module.model.state_dict())
    trainer(tmp_path, max_steps=2).fit(module, datamodule=TensorDataModule(images, batch_size=4))
    after = module.model.state_dict()
    assert module.skipped_steps == 2
    assert all(torch.equal(before[k], after[k]) for k in before)

    # control: the same run on clean images does move the weights
    clean = MAEPretrainModule(**tiny_model_kwargs, optim={"lr": 1e-2, "warmup_steps": 0})
    before = copy.deepcopy(clean.model.state_dict())
    trainer(tmp_path, max_steps=1).fit(clean, datamodule=TensorDataModule(smooth_images(4), batch_size=4))
    assert clean.skipped_steps == 0
    assert not torch.equal(before["encoder.blocks.0.attn.qkv.weight"], clean.model.encoder.blocks[0].attn.qkv.weight)


def test_tensorboard_gets_scalars_and_reconstruction_image(tmp_path: Path, tiny_model_kwargs: dict) -> None:
    module = MAEPretrainModule(**tiny_model_kwargs, optim={"warmup_steps": 1}, log_images_every_n_steps=2)
    logger = TensorBoardLogger(tmp_path, name="tb")
    trainer(tmp_path, max_steps=4, logger=logger, log_every_n_steps=1).fit(
        module, datamodule=TensorDataModule(smooth_images(4, channels=1), batch_size=2)
    )
    events = list(Path(logger.log_dir).glob("events.out.tfevents.*"))
    assert events
    acc = EventAccumulator(str(logger.log_dir), size_guidance={"images": 0, "scalars": 0}).Reload()
    scalars = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/images_per_sec", "train/skipped_steps"} <= scalars
    images = acc.Images("train/reconstruction")
    assert [im.step for im in images] == [2, 4]
    assert images[-1].width == 4 * 64 + 5 * 2 and images[-1].height == TITLE_HEIGHT + 2 * 64 + 3 * 2
    legend = acc.Tensors("train/reconstruction_legend/text_summary")
    assert b"ground-truth" in legend[-1].tensor_proto.string_val[0]


def test_masks_differ_between_ranks_and_repeat_within_a_rank() -> None:
    tokens = torch.zeros(4, 64, 1)

    def mask(rank: int, epoch: int, batch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(mask_seed(0, rank, 0, epoch, batch))
        return random_masking(tokens, 0.75, g).mask

    assert not torch.equal(mask(0, 0, 0), mask(1, 0, 0))
    assert not torch.equal(mask(0, 0, 0), mask(0, 0, 1)) and not torch.equal(mask(0, 0, 0), mask(0, 1, 0))
    assert torch.equal(mask(1, 3, 7), mask(1, 3, 7))


def test_data_with_other_channels_stops_before_training(tmp_path: Path, tiny_model_kwargs: dict) -> None:
    module = MAEPretrainModule(**tiny_model_kwargs)  # in_chans 1
    with pytest.raises(ValueError, match=r"model.mae.in_chans=1 .* 3 channel"):
        trainer(tmp_path, max_steps=1).fit(module, datamodule=TensorDataModule(smooth_images(2, 3), 2))


@pytest.mark.parametrize(("field", "value"), [("blr", 0.0), ("betas", (0.9, 1.5)), ("warmup_steps", -1)])
def test_bad_optimiser_arguments_name_the_field(field: str, value, tiny_model_kwargs: dict) -> None:
    with pytest.raises(ValueError, match=f"model.optim.{field}"):
        MAEPretrainModule(**tiny_model_kwargs, optim={field: value})


def test_loader_replacements_are_counted_across_steps(tmp_path: Path, tiny_model_kwargs: dict) -> None:
    """Each sample reports its replacements (as CacheSliceDataset does); the module sums them over steps."""

    class Reporting(torch.utils.data.Dataset):
        def __init__(self, images: torch.Tensor) -> None:
            self.images = images

        def __len__(self) -> int:
            return len(self.images)

        def __getitem__(self, i: int) -> dict:
            return {"image": self.images[i], "skipped": torch.tensor(i % 2), "rejected": torch.tensor(1)}

    class WithCounts(TensorDataModule):
        def train_dataloader(self) -> torch.utils.data.DataLoader:
            return torch.utils.data.DataLoader(Reporting(self.images), batch_size=self.batch_size)

    module = MAEPretrainModule(**tiny_model_kwargs, optim={"warmup_steps": 0})
    t = trainer(tmp_path, max_steps=2)
    t.fit(module, datamodule=WithCounts(smooth_images(4), batch_size=2))
    assert t.callback_metrics["data/unreadable_entry_skips"].item() == 2.0  # samples 1 and 3
    assert t.callback_metrics["data/background_rejects"].item() == 4.0


def test_nonfinite_gradient_under_finite_loss_is_skipped(tmp_path: Path, tiny_model_kwargs: dict) -> None:
    module = MAEPretrainModule(**tiny_model_kwargs, optim={"lr": 1e-2, "warmup_steps": 0})
    qkv = module.model.encoder.blocks[0].attn.qkv.weight
    qkv.register_hook(lambda g: g * float("inf"))  # the loss stays finite; one gradient does not
    before = copy.deepcopy(module.model.state_dict())
    trainer(tmp_path, max_steps=2).fit(module, datamodule=TensorDataModule(smooth_images(4), batch_size=4))
    assert module.skipped_steps == 2
    after = module.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    state = module.optimizers().optimizer.state[qkv]
    assert float(state["step"]) == 0.0 and not state["exp_avg"].any()  # moments untouched too


def test_training_steps_do_not_sync_with_the_host(
    tmp_path: Path, tiny_model_kwargs: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Counts every tensor -> Python read made from medmae/train/module.py: none inside the steps."""
    import inspect

    import medmae.train.module as module_file

    reads: list[str] = []

    def counting(name: str):
        original = getattr(torch.Tensor, name)

        def wrapper(self, *args, **kwargs):
            caller = inspect.currentframe().f_back
            if caller is not None and caller.f_code.co_filename == module_file.__file__:
                reads.append(caller.f_code.co_name)
            return original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, wrapper)

    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        counting(name)
    images = smooth_images(4)
    images[1, 0, 5, 5] = float("nan")  # steps get skipped: the guard itself must not read either
    module = MAEPretrainModule(**tiny_model_kwargs, optim={"lr": 1e-2, "warmup_steps": 0})
    trainer(tmp_path, max_steps=6, log_every_n_steps=100).fit(module, datamodule=TensorDataModule(images, batch_size=2))
    monkeypatch.undo()
    assert reads == ["skipped_steps"]  # one read, at the end of training, for the warning
    assert module.skipped_steps == 3  # every batch holding image 1


def test_compiled_blocks_train_three_steps(tmp_path: Path, tiny_model_kwargs: dict) -> None:
    torch.manual_seed(0)
    module = MAEPretrainModule(**tiny_model_kwargs, optim={"lr": 1e-3, "warmup_steps": 0}, compile=True)
    keys = list(module.model.state_dict())
    rec = LossRecorder()
    before = module.model.encoder.blocks[0].attn.qkv.weight.detach().clone()
    trainer(tmp_path, max_steps=3, callbacks=[rec]).fit(
        module, datamodule=TensorDataModule(smooth_images(8), batch_size=4)
    )
    assert module.model.encoder.blocks._compiled_call_impl is not None
    assert hasattr(module.model.decoder_features, "_torchdynamo_orig_callable")
    assert len(rec.losses) == 3 and all(np.isfinite(rec.losses))
    assert not torch.equal(before, module.model.encoder.blocks[0].attn.qkv.weight)
    assert list(module.model.state_dict()) == keys  # compiling in place keeps checkpoint keys
