"""ALIGN: CLIP's symmetric InfoNCE with label smoothing 0.1 and a learnable divide-by-T temperature (Jia et al.,
2021). vlp trains it on its own ViT + text towers; the paper's EfficientNet-L2 + BERT-Large towers are not
reproduced (see configs/align.py)."""

from __future__ import annotations

import jax

from vlp.objectives import register
from vlp.objectives.base import Metrics
from vlp.objectives.clip import ClipObjective


@register("align")
class AlignObjective(ClipObjective):
    """loss = (CE_eps(X Y^T / T) + CE_eps(Y X^T / T)) / 2 with eps = loss.label_smoothing (0.1 in ALIGN)."""

    def __init__(self, config):
        super().__init__(config)
        if config.model.logit_scale_parameterization != "temperature":
            raise ValueError("objective 'align' divides by a learnable temperature: set "
                             "model.logit_scale_parameterization='temperature' (configs/align.py does)")

    def loss_from_embeddings(self, out: dict[str, jax.Array]) -> tuple[jax.Array, Metrics]:
        loss, metrics = super().loss_from_embeddings(out)
        metrics["temperature"] = 1.0 / metrics["logit_scale"]
        return loss, metrics
