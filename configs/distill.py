"""CLIP-to-CLIP distillation (vlp/objectives/distill.py): a student CLIP trained with its own InfoNCE plus a term
against a frozen teacher named by `reference.path` (`reference.format`: vlp workdir | safetensors | hf | open_clip).

`clip_distill.kind="kl"` (default) is open_clip's `--distill` (open_clip src/open_clip/loss.py DistillClipLoss:
contrastive + KL between the teacher's and the student's image->text and text->image similarity distributions, each
model with its own logit scale, weight 1); `"cosine"` is DCLIP's hybrid loss (Csizmadia et al., 2025, "Distill CLIP":
contrastive + cosine similarity to the teacher's embeddings; same embed_dim needed).

Variants: `tiny` (a student of half the width of configs/clip.py:tiny; teacher = a clip.py:tiny workdir) and
`B/16` (open_clip's distillation recipe: a ViT-B/16 student from a larger teacher, e.g. an exported ViT-L/14, with
CLIP's B/16 optimizer settings, as open_clip's `--distill-model ViT-L-14 --distill-pretrained openai`).
Usage: `--config=configs/distill.py:tiny,reference.path=runs/clip`.
"""

from vlp import config as vlp_config

VARIANTS = ("tiny", "B/16")


def get_config(arg: str | None = None):
    variant, overrides = vlp_config.parse_arg(arg, VARIANTS)
    # The student is clip.py's model at the same scale.
    c = vlp_config.sibling_config_module(__file__, "clip.py").get_config(variant)
    c.objective = "clip_distill"
    c.clip_distill.update(kind="kl", weight=1.0)
    c.reference.format = "vlp"
    if variant == "tiny":
        # Half of clip.py:tiny's width (96 -> 48), same depth, heads and embedding width divided the same way.
        c.model.image.update(width=48, mlp_dim=192, num_heads=2)
        c.model.text.update(width=48, mlp_dim=192, num_heads=2)
        c.model.embed_dim = 48
    vlp_config.apply_overrides(c, overrides)
    return c

