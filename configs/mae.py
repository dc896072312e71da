"""MAE (He et al., 2022): encoder on the 25% visible patches, light decoder, normalised-pixel MSE on masked ones.

Paper values [code]: random 75% masks, fixed 2-D sin-cos position embeddings, decoder 8 x 512 (16 heads), AdamW
(0.9, 0.95), lr 1.5e-4 x batch/256, wd 0.05, 40 warmup of 800-1600 epochs, norm_pix_loss. Variants: `tiny` (CPU,
shapes, 32 px, patch 4: 64 patches, 16 visible; a 1 x 64 decoder), `B/16`, `L/14` (the paper's decoder).
Evaluated with the dense probe (no text tower). No gradient clipping (`optim.grad_clip_norm=0`), as the reference
MAE, which does not clip (vlp's base config clips at 1.0). Usage: `--config=configs/mae.py:tiny`.
"""

from vlp import config as vlp_config

VARIANTS = ("tiny", "B/16", "L/14")


def get_config(arg: str | None = None):
    variant, overrides = vlp_config.parse_arg(arg, VARIANTS)
    c = vlp_config.image_only_config("mae", variant, tiny_patch_size=4)
    c.mim.update(mask_kind="random", mask_ratio=0.75, masked_image_fraction=1.0, norm_pix=True)
    c.model.image.posemb = "sincos2d"
    c.optim.grad_clip_norm = 0.0  # the reference MAE does not clip
    if variant == "tiny":
        c.mim.update(decoder_width=64, decoder_depth=1, decoder_heads=4, decoder_mlp_dim=256)
        c.optim.update(lr=1e-3, warmup_steps=50, weight_decay=0.05, b2=0.95)
    else:
        c.total_steps = 250_000
        c.batch_size = 4096
        c.mim.update(decoder_width=512, decoder_depth=8, decoder_heads=16, decoder_mlp_dim=2048)
        c.optim.update(lr=1.5e-4 * 4096 / 256, warmup_steps=12_500, weight_decay=0.05, b2=0.95)
    vlp_config.apply_overrides(c, overrides)
    return c
