"""FDT (Chen et al., CVPR 2023; github.com/yuxiaochen1103/FDT): CLIP's InfoNCE on embeddings built from a shared
bank of finite discrete tokens (methods.md section 14).

Released CC3M recipe (the `B/32` variant): ViT-B/32, bank C = 16384 x d = 512, sd_temperature T = 1000 (constant:
decay weight 1), 32 epochs at batch 1024 (128 x 8), AdamW (0.9, 0.98), wd 0.1, lr warmed up linearly 1e-4 -> 1e-3
over 2500 steps then cosine to 0 (vlp warms up from 0), logit scale clamped to <= 100. `tiny`: clip.py:tiny's towers
and optimiser on shapes with a 1024-token bank and T = 1. The paper's T = 1000 suits its scale (d = 512, C = 16384,
long runs); at tiny's scale the scores q . f / sqrt(d) are ~1e-2 at init, so at T = 1000 sparsemax keeps all 1024
tokens with ~uniform weights for the whole run (`fdt_support` stays at 1024; every bag ~ mean(F)) and FDT learns far
slower than CLIP (800 steps: zero-shot 0.31 vs 0.89). At T = 1 the support falls to ~25 tokens within 200 steps and
the loss follows CLIP's for ~300 steps; 800 steps:
zero-shot 0.43, R@1 0.21 / 0.27 (CLIP 0.89, 0.58 / 0.62; docs/fdt.md).
Usage: `--config=configs/fdt.py:tiny` or `--config=configs/fdt.py:tiny,total_steps=300`.
"""

from vlp import config as vlp_config

VARIANTS = ("tiny", "B/32")


def get_config(arg: str | None = None):
    variant, overrides = vlp_config.parse_arg(arg, VARIANTS)
    c = vlp_config.base_config()
    c.objective = "fdt"
    if variant == "tiny":
        vlp_config.shapes_tiny(c)
        c.fdt.num_tokens = 1024
        c.fdt.temperature = 1.0  # sparse bags from the start at this scale (module docstring)
    else:
        steps_per_epoch = 3_000_000 // 1024  # CC3M
        c.total_steps = 32 * steps_per_epoch
        c.batch_size = 1024
        c.data.image_size = 224
        c.data.max_text_len = 77
        c.data.worker_count = 8
        c.model.image.variant = "B/32"
        c.model.text.update(width=512, depth=12, mlp_dim=2048, num_heads=8)
        c.model.embed_dim = 512
        c.fdt.num_tokens = 16384
        c.optim.update(lr=1e-3, warmup_steps=2500, weight_decay=0.1, b2=0.98)
        c.mesh.shape = (1, -1, 1)
        c.log_every, c.eval_every, c.checkpoint_every = 100, 2000, 2000
    vlp_config.apply_overrides(c, overrides)
    return c
