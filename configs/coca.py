"""CoCa (Yu et al., 2022): contrastive + captioning, loss = 1.0 * InfoNCE + 2.0 * caption CE (paper, open_clip).

Variants: `tiny` (CPU minutes on the embedded shapes dataset, beside configs/clip.py:tiny), `B/16` and `L/14`
(cluster recipes; they need a real data source and a real tokenizer, see the README).

Paper recipe (methods.md section 9): Base = ViT-B image tower, decoder 12 unimodal + 12 multimodal layers at 768;
Large = ViT-L, decoder 12 + 12 at 1024; attentional poolers with 1 (contrastive) and 256 (generative) queries;
SentencePiece 64k, max length 64; batch 65,536, 500k steps, Adafactor (b1 0.9, b2 0.999), decoupled weight decay
0.01, lr 8e-4, 2% warmup, linear decay; 288 px, patch 18. The cluster variants keep the architecture and the loss
weights and use vlp's AdamW at 224 px with a 32k batch (open_clip's LAION CoCa runs are AdamW too); set
`optim.*`, `batch_size` and `total_steps` for the paper's schedule.
Usage: `--config=configs/coca.py:tiny`.
"""

from vlp import config as vlp_config
from vlp.eval.captioning import default_eval

VARIANTS = ("tiny", "B/16", "L/14")


def get_config(arg: str | None = None):
    variant, overrides = vlp_config.parse_arg(arg, VARIANTS)
    c = vlp_config.base_config()
    c.objective = "coca"
    if variant == "tiny":
        # configs/clip.py:tiny's data, towers and schedule, plus one multimodal layer and a 16-query generative
        # pooler (a 32 px image has only 17 tokens; the paper's 256 queries would be 15x more than tokens).
        vlp_config.shapes_tiny(c)
        c.coca.update(multimodal_depth=1, gen_queries=16, pooler_heads=4)
        c.evals.captioning = default_eval(num_examples=500)
    else:
        width = 768 if variant == "B/16" else 1024
        c.total_steps = 100_000
        c.batch_size = 32_768
        c.data.image_size = 224
        c.data.max_text_len = 64
        c.data.worker_count = 8
        c.model.image.variant = variant
        c.model.text.update(width=width, depth=12, mlp_dim=4 * width, num_heads=width // 64)
        c.model.remat_policy = "full" if variant == "L/14" else "none"  # the ViT's and the decoder's blocks
        c.model.embed_dim = width
        c.coca.update(multimodal_depth=12, gen_queries=256, pooler_heads=8)
        c.optim.update(lr=8e-4 if variant == "B/16" else 5e-4, warmup_steps=2000, weight_decay=0.1)
        c.mesh.shape = (1, -1, 1)  # FSDP over all devices
        c.log_every, c.eval_every, c.checkpoint_every = 100, 5000, 2000
        c.evals.zeroshot.num_examples = 10_000
        c.evals.retrieval.num_examples = 5000
        c.evals.captioning = default_eval(num_examples=5000)
    vlp_config.apply_overrides(c, overrides)
    return c
