"""Mod-X (Ni et al., 2023), continual CLIP training: each phase trains on its new data with InfoNCE while it aligns
the similarity rows of the current model with those of the frozen previous-phase model (`config.reference`) on the
current batch (methods.md section 17):

    loss = InfoNCE_sym(new) + alpha * 1/2 [KL(P_old^i2t || P_new^i2t) + KL(P_old^t2i || P_new^t2i)]

P = row softmax of the raw cosine matrix (tau = 1: no logit scale), KL with reduction 'sum' (over rows and columns),
alpha = 20 (every phase script of the paper's code). Selective ("cognition") alignment: a row whose old argmax is not
the positive takes the new model's own row as its target, so it adds exactly 0 and no gradient. A phase starts from
the previous phase's params (`init_from`) and names the same model as its reference.
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections

from vlp.losses.reference import sharded_similarity_distill_loss
from vlp.objectives import register
from vlp.objectives.base import Metrics
from vlp.objectives.distill import ReferenceTwoTowerObjective
from vlp.parallel.mesh import BATCH_AXES


@register("modx")
class ModXObjective(ReferenceTwoTowerObjective):
    """loss = InfoNCE_sym + alpha * selective similarity-row KL to the previous phase's model (tau = 1, sum)."""

    @classmethod
    def default_config(cls) -> dict[str, Any]:
        return {"alpha": 20.0}  # the paper's phase scripts (argparse default 0.1 is never used)

    @classmethod
    def validate_config(cls, config: ml_collections.ConfigDict) -> None:
        if not config.modx.alpha >= 0:
            raise ValueError(f"invalid config: modx.alpha={config.modx.alpha!r} must be >= 0 (paper: 20)")

    def reference_term(self, student: dict[str, jax.Array], ref: dict[str, jax.Array]) -> tuple[jax.Array, Metrics]:
        term, metrics = sharded_similarity_distill_loss("modx", student["image_emb"], student["text_emb"], 1.0,
                                                        ref["image_emb"], ref["text_emb"], 1.0, batch_axes=BATCH_AXES)
        return self.config.modx.alpha * term, {"loss_modx": term, **metrics}
