"""CapPa (Tschannen et al., 2023): a ViT trained by captioning alone, with parallel prediction for a share of the
examples (`cappa.masked_pred_prob`, big_vision's `masked_pred_prob` = 0.75: all decoder inputs masked).

Variants: `tiny` (CPU minutes on shapes) and `B/16` (big_vision's CapPa B/16 recipe in the paper: ViT-B/16 at
224 px, a 6-layer decoder of the encoder's width that cross-attends every ViT token, 32k SentencePiece vocab, max
64 tokens, batch 8192, Adafactor-style optimizer with lr 1e-3, wd 1e-4, cosine schedule, grad clip 1.0; vlp uses
its AdamW with those values). CapPa has no text encoder: evaluate with `captioning` (and linear_probe / knn on the
mean ViT token).
Usage: `--config=configs/cappa.py:tiny`.
"""

from vlp import config as vlp_config
from vlp.eval.captioning import default_eval

VARIANTS = ("tiny", "B/16")


def get_config(arg: str | None = None):
    variant, overrides = vlp_config.parse_arg(arg, VARIANTS)
    c = vlp_config.base_config()
    c.objective = "cappa"
    if variant == "tiny":
        vlp_config.shapes_tiny(c)
        c.model.embed_dim = 128
        c.model.text.update(width=96, depth=2, mlp_dim=384, num_heads=4)  # the decoder
        c.evals = dict(captioning=default_eval(num_examples=500))
    else:
        c.total_steps = 100_000
        c.batch_size = 8192
        c.data.image_size = 224
        c.data.max_text_len = 64
        c.data.worker_count = 8
        c.model.image.variant = variant
        c.model.text.update(width=768, depth=6, mlp_dim=3072, num_heads=12)
        c.optim.update(lr=1e-3, warmup_steps=2000, weight_decay=1e-4, grad_clip_norm=1.0)
        c.mesh.shape = (1, -1, 1)
        c.log_every, c.eval_every, c.checkpoint_every = 100, 5000, 2000
        c.evals = dict(captioning=default_eval(num_examples=5000))
    vlp_config.apply_overrides(c, overrides)
    return c
