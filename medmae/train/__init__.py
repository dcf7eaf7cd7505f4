"""Pretraining: the LightningModule, its callbacks, the lr schedule and the LightningCLI entry points."""

from medmae.train.callbacks import ReconstructionLogger, ThroughputLogger, reconstruction_grid, save_grid_png
from medmae.train.module import MAEPretrainModule, weight_decay_groups
from medmae.train.schedule import lr_at_step, scaled_lr

__all__ = [
    "MAEPretrainModule",
    "ReconstructionLogger",
    "ThroughputLogger",
    "lr_at_step",
    "reconstruction_grid",
    "save_grid_png",
    "scaled_lr",
    "weight_decay_groups",
]
