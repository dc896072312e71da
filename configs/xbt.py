"""XBT, cross-modal backward-compatible training (vlp/objectives/xbt.py; Jang & Lim, 2024, arXiv 2405.14715, ICCV
2025): a projection psi maps a new CLIP's embeddings into an old CLIP's space, so an old gallery stays searchable
with new queries. The old model is `reference.path` (any format), the new one `xbt.new.path` (any format); both are
frozen, only psi trains.

What the paper states (abstract and public summaries; its code was not found): psi maps the new model's embeddings
to the old model's; it is pretrained on text alone (cheap, no image-text pairs), then trained on image-text pairs
with the new model kept unmodified (parameter-efficient). Choices made here where the paper's details were not
found: psi = 2-layer MLP (hidden 2x the old width, GELU; `xbt.projection="linear"` for one matrix), shared by images
and texts (both live in the new model's joint space, so text pretraining carries over to images); stage 1 loss =
symmetric InfoNCE between psi(new_text(t)) and old_text(t) over the global batch (temperature 0.05, optional cosine
term `xbt.cosine_weight`); stage 2 = the average of InfoNCE(psi(new_image(x)), old_text(t)) and
InfoNCE(psi(new_text(t)), old_image(x)), the two cross-model directions a retrieval system serves. The paper says
that once psi is pretrained stage 2 needs no old model; here stage 2 still reads it (its targets), and no extra
parameters beside psi are trained.

Variants:
- `tiny_text` (stage 1, shapes captions only: `xbt.stage="text"`, no image reaches the device): 400 steps.
- `tiny` (stage 2, pairs: `xbt.stage="pairs"`): 400 steps, psi from a `tiny_text` run via `init_from.path`.
- `B/16` (stage 2 at cluster scale: e.g. old = OpenAI ViT-B/32, new = a ViT-B/16 export, both 512-wide embeddings
  at 224 px, 77 tokens; batch 1024, AdamW lr 1e-4, 10k steps; the paper's exact schedule was not found: these are
  common PEFT settings, not the paper's). `B/16_text` is its stage 1.
Usage:
  python -m vlp.train --config=configs/xbt.py:tiny_text,reference.path=OLD,xbt.new.path=NEW --workdir=runs/xbt1
  python -m vlp.train --config=configs/xbt.py:tiny,reference.path=OLD,xbt.new.path=NEW,init_from.path=runs/xbt1 \
      --workdir=runs/xbt2
  python tools/eval.py --workdir=runs/xbt2 --gallery_workdir=OLD    # new queries against the old gallery
"""

from vlp import config as vlp_config

VARIANTS = ("tiny", "tiny_text", "B/16", "B/16_text")


def get_config(arg: str | None = None):
    variant, overrides = vlp_config.parse_arg(arg, VARIANTS)
    c = vlp_config.base_config()
    c.objective = "xbt"
    c.reference.format = "vlp"
    c.xbt.new.format = "vlp"
    c.xbt.update(stage="text" if variant.endswith("_text") else "pairs", projection="mlp", hidden_mult=2,
                 temperature=0.05, cosine_weight=0.0)
    if variant.startswith("tiny"):
        vlp_config.shapes_tiny(c)  # the shapes data, image size and tokens of configs/clip.py:tiny
        c.total_steps = 400
        c.optim.update(lr=1e-3, warmup_steps=40, weight_decay=0.0)
        c.log_every, c.eval_every, c.checkpoint_every = 50, 200, 200
    else:
        c.total_steps = 10_000
        c.batch_size = 1024
        c.data.image_size = 224
        c.data.max_text_len = 77
        c.data.worker_count = 8
        c.optim.update(lr=1e-4, warmup_steps=500, weight_decay=0.0)
        c.mesh.shape = (1, -1, 1)
        c.log_every, c.eval_every, c.checkpoint_every = 100, 2000, 2000
        c.evals.zeroshot.num_examples = 10_000
        c.evals.retrieval.num_examples = 5000
    vlp_config.apply_overrides(c, overrides)
    return c
