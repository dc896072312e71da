"""Prompt learning, CoOp style (Zhou et al., 2022; KaiyangZhou/CoOp): learned context vectors in front of class
names for a frozen CLIP, trained with cross-entropy over the classes on K labelled shots per class.

Variants:
- `tiny`: the frozen CLIP of configs/clip.py:tiny (`reference.path`, default runs/clip), M = 4 context vectors
  (its text tower holds 12 tokens: 4 context + up to 7 name pieces + eos), trained on the 16-shot shapes set that
  `python tools/few_shot.py --out=data/shapes_16shot --shots=16` writes (1, 4: other --shots and the mixture path);
  evaluated by zero-shot on shapes validation with the learned context before the bare class name.
- `B/16`: CoOp's recipe for a ViT-B/16 CLIP (`reference.format/path`): M = 16 random-initialised unified context
  vectors (CoOp: N(0, 0.02)), batch 32, 200 epochs at 16 shots (50 at 1 shot), lr 0.002 cosine, 1 warmup epoch.
  CoOp uses SGD; vlp's optimizer is AdamW, so its lr here is scaled down (AdamW steps are ~lr per element).
The frozen CLIP is the run's reference model (`reference.format/path`: a vlp workdir, or a safetensors, hf or
open_clip export): loaded at every start and by tools/eval.py, never checkpointed (a fingerprint checks it is the same).
Usage: `--config=configs/prompt.py:tiny,reference.path=runs/clip` (an HF CLIP: `reference.format=hf,reference.path=..`).
"""

from vlp import config as vlp_config

VARIANTS = ("tiny", "B/16")


def get_config(arg: str | None = None):
    variant, overrides = vlp_config.parse_arg(arg, VARIANTS)
    c = vlp_config.base_config()
    c.objective = "prompt"
    c.evals = dict(zeroshot=dict(type="zeroshot", split="validation", num_examples=2000, batch_size=500,
                                 templates="name"))
    c.optim.update(weight_decay=0.0, grad_clip_norm=0.0)
    if variant == "tiny":
        c.reference.path = "runs/clip"
        c.prompt.num_context = 4
        c.total_steps = 200
        c.batch_size = 64
        c.data.image_size = 32
        c.data.max_text_len = 8  # + 4 context positions = the tiny CLIP's 12
        c.data.read_threads = 1
        c.data.mixture = ("arrayrecord:data/shapes_16shot=1",)
        c.optim.update(lr=1e-2, warmup_steps=10)
        c.log_every, c.eval_every, c.checkpoint_every = 50, 100, 100
    else:
        c.prompt.update(num_context=16)
        c.total_steps = 200 * 1000 * 16 // 32  # 200 epochs of 16 shots x 1000 ImageNet classes at batch 32
        c.batch_size = 32
        c.data.image_size = 224
        c.data.max_text_len = 77 - 16
        c.optim.update(lr=2e-4, warmup_steps=500)
        c.log_every, c.eval_every, c.checkpoint_every = 100, 10_000, 10_000
    vlp_config.apply_overrides(c, overrides)
    return c
