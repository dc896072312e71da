"""Mod-X (Ni et al., 2023): continual CLIP training in phases; each phase trains InfoNCE on its new data and aligns
its similarity rows with the previous phase's model (vlp/objectives/modx.py; methods.md section 17: alpha = 20,
tau = 1, KL reduction 'sum', rows the old model got wrong replaced by the new model's).

A phase starts from the previous phase's params (`init_from.path`) and names the same workdir as its frozen
reference (`reference.path`). On shapes the phases are two halves of the 64 classes: `shapes:classes=0-31` and
`shapes:classes=32-63` (the main shape's label drawn from that range only); the evals report retrieval and zero-shot
on each half (`*_old`, `*_new`).

Variants:
  `tiny_phase1`   configs/clip.py:tiny on the old half (classes 0-31): the phase-1 model.
  `tiny`          phase 2 with Mod-X on the new half (classes 32-63); set init_from.path and reference.path to the
                  phase-1 workdir.
  `tiny_finetune` phase 2 as plain fine-tuning (CLIP on the new half from phase 1's params): the baseline.
  `B/16`          the paper's phase settings at CLIP B/16 scale: lr 5e-4, wd 0.1, AdamW eps 1e-8, alpha 20 (the paper
                  trains 35 epochs per phase from an RN50 CLIP; set total_steps for your data).
Usage: `--config=configs/modx.py:tiny,init_from.path=runs/p1,reference.path=runs/p1`.
"""

from vlp import config as vlp_config

VARIANTS = ("tiny", "tiny_phase1", "tiny_finetune", "B/16")
OLD, NEW = "shapes:classes=0-31", "shapes:classes=32-63"


def get_config(arg: str | None = None):
    variant, overrides = vlp_config.parse_arg(arg, VARIANTS)
    c = vlp_config.sibling_config_module(__file__, "clip.py").get_config("B/16" if variant == "B/16" else "tiny")
    c.objective = "clip" if variant in ("tiny_phase1", "tiny_finetune") else "modx"
    c.modx.alpha = 20.0
    if variant == "B/16":
        c.optim.update(lr=5e-4, weight_decay=0.1)
        c.init_from.format = c.reference.format = "vlp"
    else:
        c.data.source = OLD if variant == "tiny_phase1" else NEW
        if variant != "tiny_phase1":
            c.total_steps = 800
            c.optim.update(lr=1e-3, warmup_steps=50)
        c.log_every, c.eval_every, c.checkpoint_every = 100, 400, 400
        retrieval, zeroshot = c.evals.retrieval.to_dict(), c.evals.zeroshot.to_dict()
        c.evals = {f"{kind}_{half}": dict(entry, source=source, num_examples=500)
                   for half, source in (("old", OLD), ("new", NEW))
                   for kind, entry in (("retrieval", retrieval), ("zeroshot", zeroshot))}
    vlp_config.apply_overrides(c, overrides)
    return c

