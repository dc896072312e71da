"""EVA (Fang et al., 2023): masked feature regression to a frozen teacher's patch features (-cosine on masked patches).

Paper values [code]: BEiT block masks, 105 of 256 patches (~40%), min 16 patches per block; teacher = OpenAI CLIP
ViT-L/14 patch tokens after `ln_post` and `@ proj` (the image-text aligned space); AdamW (0.9, 0.98), lr 1e-3, wd
0.05, clip-grad 3. Here the teacher is any vlp run with patch tokens and the same patch grid, named by
`mim.teacher_workdir` (required to start), e.g. a `configs/clip.py:tiny` run for `tiny` (32 px, patch 8: a 4x4 grid,
so blocks of min 2 patches). Targets: `mim.teacher_features="aligned"` (default, as EVA: ln_post then the image
projection, needs a clip/siglip/align teacher) or `"patch_tokens"` (ln_post tokens before the projection).
At the first start the teacher's config is recorded in the run's config.json (`mim.teacher_config`) and its params
go into the run's checkpoints: resuming (from the run's config.json), `tools/eval.py` and `tools/export.py` need
no teacher workdir. Evaluated with the dense probe (no text tower).
Usage: `--config=configs/eva.py:tiny,mim.teacher_workdir=runs/clip`.
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
