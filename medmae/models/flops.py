"""Analytic FLOPs of one MAE training step: the denominator of MFU in the logs and the benchmarks.

Counted: the matmuls (2 FLOPs per multiply-add), forward + backward = 3 x forward. The patch
embedding runs on all N patches (they are embedded before masking), the encoder blocks on the K
visible tokens + class token, the decoder blocks and prediction on N + 1 positions. A transformer
block on T tokens of width D with MLP ratio r costs ``2*T*D^2*(4 + 2r)`` (qkv, projection, MLP) +
``4*T^2*D`` (scores and weighted values). Norms, softmax and the loss are left out (a few percent); so is
the HOG target's histogram (``hog_weight``), while its prediction head is counted like the pixel head.

ViT-B/16, 224^2, 3 channels, mask 0.75, decoder 512 x 8: 58.7 GFLOP per image; ViT-L/16: 124.5 GFLOP.
"""

from __future__ import annotations

from medmae.models.mae_base import MAEBase
from medmae.models.masking import visible_count


def block_flops(tokens: int, width: int, mlp_ratio: float = 4.0) -> float:
    """Forward matmul FLOPs of one pre-norm transformer block."""
    return 2.0 * tokens * width * width * (4.0 + 2.0 * mlp_ratio) + 4.0 * tokens * tokens * width


def mae_train_flops(
    num_patches: int,
    patch_dim: int,
    embed_dim: int,
    depth: int,
    decoder_dim: int,
    decoder_depth: int,
    mask_ratio: float = 0.75,
    mlp_ratio: float = 4.0,
    decoder_mlp_ratio: float = 4.0,
) -> float:
    """FLOPs per image of one training step (``patch_dim`` = patch_size**2 * channels; 3D: patch_size**3 * channels)."""
    n = num_patches
    k = visible_count(n, mask_ratio)
    forward = (
        2.0 * n * patch_dim * embed_dim
        + depth * block_flops(k + 1, embed_dim, mlp_ratio)
        + 2.0 * (k + 1) * embed_dim * decoder_dim
        + decoder_depth * block_flops(n + 1, decoder_dim, decoder_mlp_ratio)
        + 2.0 * n * decoder_dim * patch_dim
    )
    return 3.0 * forward


def model_train_flops(model: MAEBase) -> float:
    """:func:`mae_train_flops` of a built model (2D or 3D), read from its modules."""
    enc = model.encoder
    enc_mlp = enc.blocks[0].mlp.fc1.out_features / enc.embed_dim if len(enc.blocks) else 4.0
    dec_dim = model.decoder_embed.out_features
    dec_mlp = model.decoder_blocks[0].mlp.fc1.out_features / dec_dim if len(model.decoder_blocks) else 4.0
    hog_head = getattr(model, "decoder_pred_hog", None)
    hog = 3.0 * 2.0 * model.num_patches * dec_dim * hog_head.out_features if hog_head is not None else 0.0
    return hog + mae_train_flops(
        num_patches=model.num_patches,
        patch_dim=model.decoder_pred.out_features,  # voxels per patch x channels, 2D or 3D
        embed_dim=enc.embed_dim,
        depth=len(enc.blocks),
        decoder_dim=dec_dim,
        decoder_depth=len(model.decoder_blocks),
        mask_ratio=model.mask_ratio,
        mlp_ratio=enc_mlp,
        decoder_mlp_ratio=dec_mlp,
    )
