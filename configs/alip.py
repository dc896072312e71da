"""ALIP (Yang et al., "ALIP: Adaptive Language-Image Pre-training with Synthetic Caption", ICCV 2023).

A CLIP two-tower model trained on two text paths per image: the raw web caption (vlp records: `caption_noisy`) and a
synthetic caption (the paper generates it with OFA; vlp records: `caption_synthetic`). Both go through the same text
tower; the image has one embedding. The loss is ALIP's adaptive contrastive loss on each path, summed, with weights
from two gates (vlp/losses/adaptive.py has the formulas):
- Language consistency gate (per sample): min(exp(2 (<raw, synthetic> - m)), 1), m the running mean of that cosine.
- Description consistency gate (per image-text pair): exp(2 (<text, image> - m_text)) for each path, where m_text is
  that path's running mean; set to 1 wherever the sample gate is open.

What the public code (github.com/deepglint/ALIP: train.py, src/open_alip/loss.py, scripts/train_yfcc15m_B32_ALIP.sh)
settles that the abstract leaves open:
- The running means start at 1.0 and move by 0.01 per step (`m <- 0.99 m + 0.01 mean_batch`), updated before the
  step's weights are computed; the similarities and means are over the all-gathered global batch, without gradient.
- Gate form: `exp(s - m) ** 2`; the sample weight is clipped at 1, the pair weights are not clipped, and both pair
  weights are forced to 1 where the *sample* gate's unclipped value is >= 1 (the code tests `weight_sample_raw`,
  not the pair weight itself: we follow the code).
- Loss per path: mean over the global batch of w_sample * w_pair * (CE_i2t + CE_t2i) / 2; total = raw + synthetic.
- Recipe (YFCC15M, ViT-B/32 script): AdamW (0.9, 0.98), lr 1e-3, weight decay 0.2, 32 epochs, one-cycle cosine
  with 10% warmup, 512 images per GPU on 8 GPUs per node (global 4096 for one node), gradient clipping at norm 1,
  logit scale clamped at 100, text context 77 (both captions). The paper also trains ViT-B/16 with this recipe;
  `B/16` below uses it at vlp's 224 px.

Variants: `tiny` (CPU demo on shapes; clip.py:tiny's model and schedule, so the two compare at equal steps) and
`B/16` (cluster recipe above; needs a real data source with two captions per record).
"""

from vlp import config as vlp_config

VARIANTS = ("tiny", "B/16")


def get_config(arg: str | None = None):
    variant, overrides = vlp_config.parse_arg(arg, VARIANTS)
    c = vlp_config.base_config()
    c.objective = "alip"
    if variant == "tiny":
        # clip.py:tiny's towers and schedule: 1600 steps at batch 128, both captions of every example each step.
        vlp_config.shapes_tiny(c)
        c.data.synthetic_caption_prob = 0.5  # both captions are used; this only affects the single-caption evals
    else:
        steps_per_epoch = 15_061_515 // 4096  # YFCC15M at the script's one-node global batch
        c.total_steps = 32 * steps_per_epoch
        c.batch_size = 4096
        c.data.image_size = 224
        c.data.max_text_len = 77
        c.data.worker_count = 8
        c.model.image.variant = "B/16"
        c.model.text.update(width=512, depth=12, mlp_dim=2048, num_heads=8)
        c.model.embed_dim = 512
        c.optim.update(lr=1e-3, warmup_steps=c.total_steps // 10, weight_decay=0.2, b2=0.98, grad_clip_norm=1.0)
        c.mesh.shape = (1, -1, 1)  # FSDP over all devices
        c.log_every, c.eval_every, c.checkpoint_every = 100, 5000, 2000
        c.evals.zeroshot.num_examples = 10_000
        c.evals.retrieval.num_examples = 5000
    vlp_config.apply_overrides(c, overrides)
    return c
