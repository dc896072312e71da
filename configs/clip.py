"""CLIP (Radford et al., 2021): symmetric InfoNCE, learnable temperature (init 1/0.07, clamp 100).

Variants: `tiny` (the CPU demo on the embedded shapes dataset: minutes on 2 cores), `bench` (fixed dims for
benchmarks/train_step.py), `B/16` and `L/14` (cluster recipes in the style of OpenCLIP's LAION runs; they need a
real data source, see the README).
Usage: `--config=configs/clip.py:tiny` or `--config=configs/clip.py:tiny,total_steps=300`.
"""

from vlp import config as vlp_config

VARIANTS = ("tiny", "bench", "B/16", "L/14")


def get_config(arg: str | None = None):
    variant, overrides = vlp_config.parse_arg(arg, VARIANTS)
    c = vlp_config.base_config()
    c.objective = "clip"
    if variant == "tiny":
        vlp_config.shapes_tiny(c)  # the CPU demo (its calibration is in the helper's docstring)
    elif variant == "bench":
        # Fixed dims for benchmarks/train_step.py, so throughput and MFU figures compare across machines and
        # commits: ViT 64 px / patch 8 (65 tokens), text 32 tokens over an 8192-row embedding table (a real
        # vocabulary's size; the bundled tokenizer has 384 pieces, the benchmark's synthetic tokens use all rows),
        # both towers 256 wide, 6 deep, 4 heads, MLP 1024.
        # fp32 is the CPU setting; on GPU/TPU pass `--set precision.compute_dtype=bfloat16` (or `auto`).
        c.batch_size = 128
        c.data.image_size = 64
        c.data.max_text_len = 32
        c.model.image.update(width=256, depth=6, mlp_dim=1024, num_heads=4, patch_size=8)
        c.model.text.update(width=256, depth=6, mlp_dim=1024, num_heads=4, vocab_size=8192)
        c.model.embed_dim = 256
        c.precision.compute_dtype = "float32"
    else:
        # Cluster scale: 32k global batch, AdamW (0.9, 0.98), lr 5e-4 (B/16) / 4e-4 (L/14), wd 0.2, 2k warmup.
        c.total_steps = 100_000
        c.batch_size = 32_768
        c.data.image_size = 224
        c.data.max_text_len = 77
        c.data.worker_count = 8
        c.model.image.variant = variant
        width = 512 if variant == "B/16" else 768
        c.model.text.update(width=width, depth=12, mlp_dim=4 * width, num_heads=width // 64)
        c.model.embed_dim = 512 if variant == "B/16" else 768
        c.model.remat_policy = "full" if variant == "L/14" else "none"  # both towers recompute each block
        c.optim.update(lr=5e-4 if variant == "B/16" else 4e-4, warmup_steps=2000, weight_decay=0.2)
        c.mesh.shape = (1, -1, 1)  # FSDP over all devices
        c.log_every, c.eval_every, c.checkpoint_every = 100, 5000, 2000
        c.evals.zeroshot.num_examples = 10_000
        c.evals.retrieval.num_examples = 5000
    vlp_config.apply_overrides(c, overrides)
    return c
