"""CLIP: symmetric softmax InfoNCE over the global batch with a learnable temperature (Radford et al., 2021)."""

from __future__ import annotations

from vlp.objectives import register
from vlp.objectives.two_tower import TwoTowerObjective


@register("clip")
class ClipObjective(TwoTowerObjective):
    """loss = InfoNCE_sym(image_emb, text_emb, t) over the global batch, t = exp(log_logit_scale) <= 100."""

    loss_kind = "softmax"
