"""SigLIP: pairwise sigmoid loss with a learnable scale and bias (Zhai et al., 2023)."""

from __future__ import annotations

from vlp.objectives import register
from vlp.objectives.two_tower import TwoTowerObjective


@register("siglip")
class SiglipObjective(TwoTowerObjective):
    """loss = -(1/B) sum_ij log sigmoid(z_ij (t x_i.y_j + b)) over the global batch; t = exp(t'), t' init log 10,
    b init -10 (configs/siglip.py)."""

    loss_kind = "sigmoid"

    def __init__(self, config):
        super().__init__(config)
        if config.model.logit_bias_init is None:
            raise ValueError("objective 'siglip' learns a logit bias: set model.logit_bias_init (SigLIP: -10.0; "
                             "configs/siglip.py does)")
        if config.loss.label_smoothing:
            raise ValueError(f"loss.label_smoothing={config.loss.label_smoothing} has no meaning for the sigmoid "
                             "loss; set it to 0.0")
