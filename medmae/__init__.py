"""medmae: masked-autoencoder pretraining of timm Vision Transformers on hospital scan archives."""

__version__ = "0.1.0"
