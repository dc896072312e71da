"""CleanCLIP (Bansal et al., 2023): fine-tune a (possibly backdoored) CLIP on clean pairs with in-modal
self-supervision beside the multimodal InfoNCE (methods.md section 18; nishadsinghi/CleanCLIP@d6e2f1d):
loss = clip_weight * InfoNCE_sym(I, T) + inmodal_weight * 1/2 [CE(t I I~^T) + CE(t T T~^T)], I~ = an augmented view
of the image, T~ = an EDA-augmented caption, both in-modal terms one-directional and at CLIP's logit scale.

Variants:
- `backdoor`: configs/clip.py:tiny trained on a BadNet-poisoned shapes set (tools/poison.py: 3% of 100k images
  with a 4 px checkerboard in the lower right corner, captions naming "purple star"), evaluated on clean shapes with
  the attack success rate (`evals.attack`). Objective `clip`: this is the model CleanCLIP cleans.
- `tiny`: CleanCLIP fine-tuning of the `backdoor` run (`init_from.path`, default runs/backdoor) on clean shapes.
- `tiny_plain`: the same fine-tuning with the in-modal terms off (inmodal_weight=0), the control that shows how much
  plain clean fine-tuning alone removes.
- `B/16`: the paper's recipe: fine-tune a CLIP checkpoint (`init_from`) on ~100k clean pairs for 10 epochs,
  batch 64, lr 1e-5 (AdamW, wd 0.1, the paper's pretraining settings otherwise), clip_weight = inmodal_weight = 1.
  The paper's image view is AutoAugment; vlp's per-visit view is its own random resized crop + flip
  (vlp/data/augment.py), and the text view EDA (vlp/data/eda.py) over a shipped synonym table.
Usage: `python tools/poison.py --out=data/backdoor_shapes`, then `--config=configs/cleanclip.py:backdoor`
(workdir runs/backdoor), then `--config=configs/cleanclip.py:tiny`.
"""

from vlp import config as vlp_config

VARIANTS = ("tiny", "tiny_plain", "backdoor", "B/16")


def attack_eval() -> dict:
    """The attack success rate of the poisoned set's trigger and target (as tools/poison.py's defaults)."""
    return dict(type="attack_success", split="validation", num_examples=2000, batch_size=500, target="purple star",
                trigger_size=4, corner="lower right")


def get_config(arg: str | None = None):
    variant, overrides = vlp_config.parse_arg(arg, VARIANTS)
    c = vlp_config.base_config()
    c.objective = "cleanclip"
    if variant in ("tiny", "tiny_plain", "backdoor"):
        # configs/clip.py:tiny's data and towers.
        vlp_config.shapes_tiny(c)
        c.evals.attack = attack_eval()
        c.log_every, c.eval_every, c.checkpoint_every = 100, 200, 200
    if variant == "backdoor":
        c.objective = "clip"
        c.total_steps = 1600
        c.data.mixture = ("arrayrecord:data/backdoor_shapes=1",)  # evaluation stays on clean shapes (data.source)
        c.optim.update(lr=2e-3, warmup_steps=150, weight_decay=0.05)
        c.eval_every = 400
    elif variant in ("tiny", "tiny_plain"):
        # Fine-tuning at half of pretraining's lr, 450 steps (0.6 of an epoch of 100k clean pairs): measured on
        # shapes, lr 2e-4 for 150 steps moved neither run's attack success (0.995 both), while 1e-3 separates them
        # from step ~150 on (docs/cleanclip.md: attack success CleanCLIP 0.92 / 0.75 / 0.65, plain 0.95 / 0.91 /
        # 0.89 at steps 150 / 300 / 450, clean zero-shot 0.89 both). Clean data never carries the trigger, so only
        # weight movement forgets it: a too-small lr leaves both at the backdoored model. (The paper's 1e-5 is for
        # a 400M-pair CLIP, 10 epochs.)
        c.total_steps = 450
        c.init_from = dict(format="vlp", path="runs/backdoor")
        c.optim.update(lr=1e-3, warmup_steps=20, weight_decay=0.05)
        if variant == "tiny_plain":
            c.cleanclip.inmodal_weight = 0.0
    elif variant == "B/16":
        c.total_steps = 15_630  # 10 epochs of 100k pairs at batch 64
        c.batch_size = 64
        c.data.image_size = 224
        c.data.max_text_len = 77
        c.data.worker_count = 8
        c.model.image.variant = "B/16"
        c.model.text.update(width=512, depth=12, mlp_dim=2048, num_heads=8)
        c.model.embed_dim = 512
        c.init_from = dict(format="open_clip", path="")  # the poisoned checkpoint to clean
        c.optim.update(lr=1e-5, warmup_steps=0, weight_decay=0.1)
        c.mesh.shape = (1, -1, 1)
        c.log_every, c.eval_every, c.checkpoint_every = 100, 1563, 1563
        c.evals.zeroshot.num_examples = 10_000
    vlp_config.apply_overrides(c, overrides)
    return c
