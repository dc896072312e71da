"""CLIP: symmetric softmax InfoNCE over the global batch with a learnable temperature (Radford et al., 2021)."""

from __future__ import annotations

from typing import Any

import jax

from vlp.losses.contrastive import sharded_softmax_contrastive_loss
from vlp.objectives import register
from vlp.objectives.base import Metrics
from vlp.objectives.two_tower import TwoTowerObjective
from vlp.parallel.mesh import BATCH_AXES


@register("clip")
class ClipObjective(TwoTowerObjective):
    """loss = InfoNCE_sym(image_emb, text_emb, t) over the global batch, t = exp(log_logit_scale) <= 100."""

    def loss_fn(self, params: Any, batch: dict[str, jax.Array], rng: jax.Array) -> tuple[jax.Array, Metrics]:
        del rng  # deterministic forward (no dropout)
        out = self.embed(params, batch)
        return sharded_softmax_contrastive_loss(
            out["image_emb"], out["text_emb"], out["logit_scale"], self.config.loss.label_smoothing,
            batch_axes=BATCH_AXES, variant=self.config.loss.variant)
