"""ALBEF (Li et al., 2021): ITC with momentum queues and distillation + ITM with hard negatives + MLM.

Variants: `tiny` (CPU minutes on the embedded shapes dataset, beside configs/clip.py:tiny) and `B/16` (the cluster
recipe of ALBEF's configs/Pretrain.yaml, salesforce/ALBEF@b9727e4, methods.md section 10: ViT-B/16 at 256 px,
BERT-base split 6 text + 6 fusion layers, embed 256, queue 65,536, m 0.995, alpha 0.4 ramped over the first epoch,
batch 64 x 8 = 512, AdamW lr 1e-4, wd 0.02, cosine to 1e-5 (lr_min_ratio 0.1) after a warmup, 30 epochs; the
paper inits ViT from DeiT and BERT from bert-base: pass `init_from` for that). It needs a real data source and a
BERT-size tokenizer.
Usage: `--config=configs/albef.py:tiny`.
"""

from vlp import config as vlp_config

VARIANTS = ("tiny", "B/16")


def get_config(arg: str | None = None):
    variant, overrides = vlp_config.parse_arg(arg, VARIANTS)
    c = fusion_config("albef", variant)
    vlp_config.apply_overrides(c, overrides)
    return c


def fusion_config(objective: str, variant: str):
    """ALBEF's recipe of `variant` for `objective` (albef, or tcl: ALBEF's recipe with its own config block)."""
    c = vlp_config.base_config()
    c.objective = objective
    block = c[objective]
    if variant == "tiny":
        # configs/clip.py:tiny's data, image tower and schedule; the text side is 1 text-only + 1 fusion layer.
        vlp_config.shapes_tiny(c)
        c.model.text.update(width=96, depth=2, mlp_dim=384, num_heads=4)
        block.update(fusion_layer=1, queue_size=1024, alpha_ramp_steps=400)
        c.evals.retrieval_itm = dict(type="retrieval_itm", split="validation", num_examples=500, batch_size=250,
                                     caption="synthetic", k=16)
        c.evals.itm = dict(type="itm", split="validation", num_examples=500, batch_size=250, caption="synthetic")
    else:
        c.total_steps = 230_000  # 30 epochs of 4M pairs at batch 512
        c.batch_size = 512
        c.data.image_size = 256
        c.data.max_text_len = 30
        c.data.worker_count = 8
        c.model.image.variant = "B/16"
        c.model.text.update(width=768, depth=12, mlp_dim=3072, num_heads=12)
        c.model.embed_dim = 256
        block.update(fusion_layer=6, queue_size=65_536, momentum=0.995, alpha=0.4, alpha_ramp_steps=7_800)
        c.optim.update(lr=1e-4, warmup_steps=1000, weight_decay=0.02, min_lr_ratio=0.1)
        c.mesh.shape = (-1, 1, 1)
        c.log_every, c.eval_every, c.checkpoint_every = 100, 5000, 2000
        c.evals.retrieval_itm = dict(type="retrieval_itm", split="validation", num_examples=5000, batch_size=256,
                                     caption="all", k=128)
    return c
