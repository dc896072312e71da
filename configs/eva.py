"""EVA (Fang et al., 2023): masked feature regression to a frozen teacher's patch features (-cosine on masked patches).

Paper values [code]: BEiT block masks, 105 of 256 patches (~40%), min 16 patches per block; teacher = OpenAI CLIP
ViT-L/14 patch tokens after `ln_post` and `@ proj` (the image-text aligned space); AdamW (0.9, 0.98), lr 1e-3, wd
0.05, clip-grad 3. Here the teacher is the run's frozen reference model (`reference.path`, required to start, and
`reference.format`: a vlp workdir, the default, or a safetensors, hf or open_clip export, e.g. an HF or open_clip
CLIP) with patch tokens and the same patch grid, e.g. a `configs/clip.py:tiny` run for `tiny` (32 px, patch 8: a
4x4 grid, so blocks of min 2 patches). Targets: `mim.teacher_features="aligned"` (default, as EVA: ln_post then the
image projection, needs a clip/siglip/align teacher) or `"patch_tokens"` (ln_post tokens before the projection).
The teacher is loaded at every start and is not in the run's checkpoints (they keep its fingerprint: a resume needs
the same teacher at reference.path); its config is recorded in the run's config.json (`reference.config`), so
`tools/eval.py` and `tools/export.py` need no teacher. Evaluated with the dense probe (no text tower).
Usage: `--config=configs/eva.py:tiny,reference.path=runs/clip` (a vlp workdir; an export:
`reference.format=hf,reference.path=exports/clip_hf`).
"""

from vlp import config as vlp_config

VARIANTS = ("tiny", "B/16", "L/14")


def get_config(arg: str | None = None):
    variant, overrides = vlp_config.parse_arg(arg, VARIANTS)
    c = vlp_config.image_only_config("eva", variant, tiny_patch_size=8)
    c.mim.update(mask_kind="block", mask_ratio=0.4, min_block=16)
    if variant == "tiny":
        c.mim.min_block = 2
        c.optim.update(lr=1e-3, warmup_steps=50, weight_decay=0.05)
    else:
        c.total_steps = 150_000
        c.batch_size = 4096
        c.optim.update(lr=1e-3, warmup_steps=5000, weight_decay=0.05, grad_clip_norm=3.0)
    vlp_config.apply_overrides(c, overrides)
    return c
