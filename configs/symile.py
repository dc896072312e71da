"""Symile (Saporta et al., NeurIPS 2024; github.com/rajesh-lab/symile): image, text and a 1-D signal contrasted with
the multilinear inner product (methods.md section 13).

Data: `shapes:xor` (vlp/data/shapes_xor.py), where each pair of modalities shares only the shape and the signal's
frequency is (image colour group, warm | cool) XOR (the text's 1-bit key): a dependence only a total-correlation
objective can learn. Evaluated by `signal_zeroshot`: the signal class (16 candidates; the shape alone gives 0.5)
given image and text, scored by MIP (Symile's zero-shot) and by the sum of pairwise dot products (the pairwise
baseline's). Measured on CPU (docs/symile.md): `tiny` 0.975 at 200 steps, 0.994 at 800; `tiny_pairwise` 0.49 at
200, 0.505 at 800 (the shape alone).

Variants: `tiny` (Symile, O(N) negatives, the CPU demo), `tiny_pairwise` (the same model and data with the paper's
pairwise-CLIP baseline L_ab + L_bc + L_ac), `tiny_n2` (O(N^2) negatives), `B/16` (cluster towers). The paper trains
its Symile-M3 models on features of pretrained encoders with a learnable logit scale (init as in the reference
code's XOR toy, log scale -0.3 there); `tiny` starts the scale at its clamp, 100 (see get_config). `B/16` keeps
clip.py:B/16's towers and AdamW recipe (OpenCLIP LAION style) and needs a source with a `signal` modality (shards
with `signals`, see vlp/data/records.py).
Usage: `--config=configs/symile.py:tiny` or `--config=configs/symile.py:tiny_pairwise,total_steps=300`.
"""

from vlp import config as vlp_config

VARIANTS = ("tiny", "tiny_pairwise", "tiny_n2", "B/16")


def get_config(arg: str | None = None):
    variant, overrides = vlp_config.parse_arg(arg, VARIANTS)
    c = vlp_config.base_config()
    c.objective = "symile"
    if variant.startswith("tiny"):
        # clip.py:tiny's towers and optimiser on the three-modality shapes variant.
        vlp_config.shapes_tiny(c)
        c.data.synthetic_caption_prob = 0.5
        c.data.source = "shapes:xor"
        c.data.train_caption = "noisy"  # both caption kinds are the same keyed text in shapes:xor
        # A triple's MIP is small unless its mass sits on few dims: shape-only embeddings (one-hot-like) reach MIP ~1,
        # an XOR code spread over 2^bits sign patterns only ~2^(-bits/2). In a toy the shape-only optimum (loss
        # ~ ln 3) traps runs at t = 1/0.07 and t = 30 and the 3-bit XOR is learned at t >= 50 (docs/symile.md).
        c.model.logit_scale_init = 100.0
        c.symile.update(signal_len=32, signal_width=96, signal_depth=2, signal_mlp_dim=384)
        c.symile.loss = "pairwise" if variant == "tiny_pairwise" else "symile"
        c.symile.negative_sampling = "n_squared" if variant == "tiny_n2" else "n"
    else:
        c.total_steps = 100_000
        c.batch_size = 32_768
        c.data.image_size = 224
        c.data.max_text_len = 77
        c.data.worker_count = 8
        c.model.image.variant = variant
        c.model.text.update(width=512, depth=12, mlp_dim=2048, num_heads=8)
        c.model.embed_dim = 512
        c.symile.update(signal_width=512, signal_depth=4, signal_mlp_dim=2048)
        c.optim.update(lr=5e-4, warmup_steps=2000, weight_decay=0.2)
        c.mesh.shape = (1, -1, 1)
        c.log_every, c.eval_every, c.checkpoint_every = 100, 5000, 2000
    c.evals = dict(
        signal_zeroshot=dict(type="signal_zeroshot", split="validation", num_examples=2000, batch_size=500,
                             scoring="mip"),
        signal_zeroshot_pairwise=dict(type="signal_zeroshot", split="validation", num_examples=2000,
                                      batch_size=500, scoring="pairwise"),
    )
    vlp_config.apply_overrides(c, overrides)
    return c
