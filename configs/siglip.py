"""SigLIP (Zhai et al., 2023): pairwise sigmoid loss, learnable scale t = exp(t') (t' init log 10) and bias b
(init -10); MAP-head image pooling, bidirectional text tower pooled at the last position, LayerNorm eps 1e-6;
no image projection and no text padding mask, as Hugging Face's SiglipModel (so the weights export there).

Variants: `tiny` (CPU run on the embedded shapes dataset, the CLIP demo's towers), `B/16` and `So400m/14`
(cluster recipes after big_vision's SigLIP: 32k global batch, Adam b2 0.95, lr 1e-3, wd 1e-4, `ring` loss so the
per-device loss memory does not grow with the batch; they need a real data source, see the README).
Usage: `--config=configs/siglip.py:tiny` or `--config=configs/siglip.py:B/16,loss.variant=gather`.
"""

from pathlib import Path

from vlp import config as vlp_config

VARIANTS = ("tiny", "B/16", "So400m/14")


def get_config(arg: str | None = None):
    variant, overrides = vlp_config.parse_arg(arg, VARIANTS)
    c = vlp_config.load_config_file(f"{Path(__file__).with_name('clip.py')}:{'tiny' if variant == 'tiny' else 'B/16'}")
    c.objective = "siglip"
    c.model.logit_scale_init = 10.0
    c.model.logit_bias_init = -10.0
    c.model.ln_eps = 1e-6
    c.model.activation = "gelu_tanh"
    c.model.image.update(pool="map", ln_pre=False, patch_bias=True)
    # Hugging Face SiglipModel's fixed choices, so every variant exports (tools/export.py --format=hf): no image
    # projection (the image embedding is the MAP head output: embed_dim = the vision width), a text head with a
    # bias, and no text padding mask (the text tower attends to padding; pooling reads the last position).
    c.model.text.update(causal=False, pool="last", padding_mask=False)
    c.model.image_projection = False
    c.model.projection_bias = True
    if variant != "tiny":  # tiny keeps the CLIP demo's optimizer (b2 0.95, wd 1e-4 gave 0.694 vs 0.720 top-1)
        c.model.image.variant = variant
        width = 768 if variant == "B/16" else 1152
        depth, mlp_dim, heads = (12, 3072, 12) if variant == "B/16" else (27, 4304, 16)
        c.model.text.update(width=width, depth=depth, mlp_dim=mlp_dim, num_heads=heads)
        c.model.embed_dim = width
        c.model.remat_policy = "none" if variant == "B/16" else "full"
        c.data.max_text_len = 64 if variant == "B/16" else 16  # the released So400m/14@224 reads 16 tokens
        c.batch_size = 32_768
        c.loss.variant = "ring"
        c.optim.update(lr=1e-3, b2=0.95, weight_decay=1e-4, warmup_steps=5000)
    vlp_config.apply_overrides(c, overrides)
    return c
