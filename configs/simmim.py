"""SimMIM (Xie et al., 2022): mask token in the encoder, linear pixel head, L1 on masked pixels.

Paper values [code]: 60% of 32x32-pixel mask patches at 224 px (ViT-B/16: blocks of 2x2 patches), AdamW
(0.9, 0.999), lr 1e-4 x batch/512, wd 0.05, warmup 10 of 800 epochs. Here masks are BEiT-style blocks (min 4
patches) at ratio 0.6, which also covers the 2x2-patch grid of SimMIM's ViT recipe. Variants: `tiny` (CPU, shapes,
32 px, patch 4: an 8x8 grid), `B/16`, `L/14`. Evaluated with the dense probe (no text tower).
Usage: `--config=configs/simmim.py:tiny`.
"""

from vlp import config as vlp_config

VARIANTS = ("tiny", "B/16", "L/14")


def get_config(arg: str | None = None):
    variant, overrides = vlp_config.parse_arg(arg, VARIANTS)
    c = vlp_config.image_only_config("simmim", variant, tiny_patch_size=4)
    c.mim.update(mask_kind="block", mask_ratio=0.6, min_block=4)
    if variant == "tiny":
        c.optim.update(lr=1e-3, warmup_steps=50, weight_decay=0.05, b2=0.999)
    else:
        c.total_steps = 250_000  # 800 epochs of ImageNet-1k at batch 4096 ~ 250k steps
        c.batch_size = 2048
        c.optim.update(lr=1e-4 * 2048 / 512, warmup_steps=10_000, weight_decay=0.05, b2=0.999, grad_clip_norm=5.0)
    vlp_config.apply_overrides(c, overrides)
    return c
