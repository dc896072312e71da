"""TCL (Yang et al., 2022): ALBEF plus intra-modal contrast and local mutual information (methods.md section 12).

L = L_mlm + L_itm + L_ita with L_ita = (1/6)[L_i2t + L_t2i + L_i2i + L_t2t + L_lmi_img + L_lmi_txt]:
- cross-modal (i2t, t2i): ALBEF's ITC with momentum distillation, but the momentum encoder sees the second augmented
  view (`image_aug`, vlp.data.views), so every momentum image target comes from view 2;
- intra-modal (i2i, t2t): online feature vs [momentum features of the same example ; queue], one-hot targets;
- local MI: the online global feature against the momentum locals (image: projected patch tokens of view 2,
  average-pooled to `lmi_grid` x `lmi_grid`; text: projected caption tokens, padding excluded), in-batch.
Everything else (queues, EMA, ITM hard negatives, MLM, batch scope) is ALBEF's (vlp.objectives.albef).
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import numpy as np

from vlp.data.views import SECOND_VIEW_KEY, AddSecondView
from vlp.losses import fusion
from vlp.models.fusion import FusionModel
from vlp.objectives import register
from vlp.objectives.albef import AlbefObjective, _check, albef_defaults, validate_albef_block
from vlp.objectives.base import Metrics


@register("tcl")
class TclObjective(AlbefObjective):
    block_name = "tcl"

    @classmethod
    def default_config(cls) -> dict[str, Any]:
        return dict(albef_defaults(), lmi_grid=4, view_strength=1.0)

    @classmethod
    def validate_config(cls, config: ml_collections.ConfigDict) -> None:
        block = config.tcl
        validate_albef_block(block, "tcl", config)
        _check(isinstance(block.lmi_grid, int) and block.lmi_grid > 0,
               f"tcl.lmi_grid={block.lmi_grid!r} must be a positive integer")
        _check(block.view_strength >= 0, f"tcl.view_strength={block.view_strength} must be >= 0")

    def __init__(self, config: ml_collections.ConfigDict):
        super().__init__(config)
        self.grid = config.data.image_size // self.model.image["patch_size"]
        _check(self.grid % self.block.lmi_grid == 0,
               f"tcl.lmi_grid={self.block.lmi_grid} does not divide the {self.grid}x{self.grid} patch grid "
               f"(data.image_size / patch size)")

    def example_batch(self, batch_size: int) -> dict[str, np.ndarray]:
        out = super().example_batch(batch_size)
        out[SECOND_VIEW_KEY] = np.zeros_like(out["image"])
        return out

    def train_example_transform(self, default: Any) -> Any:
        return AddSecondView(super().train_example_transform(default), self.config.seed, self.block.view_strength)

    def loss_fn_with_extra(self, params: Any, extra: Any, batch: dict[str, jax.Array], rng: jax.Array,
                           step: jax.Array) -> tuple[jax.Array, tuple[Metrics, Any]]:
        block = self.block
        _, metrics, t = self.forward(params, extra, batch, rng, step, momentum_images=batch[SECOND_VIEW_KEY])
        queues = jax.lax.stop_gradient((extra["image_queue"], extra["text_queue"]))
        temp = t["temp"]
        i2i, _ = fusion.queue_contrastive_loss(t["image_feat"], t["image_feat_m"], queues[0], temp,
                                               groups=self.groups)
        t2t, _ = fusion.queue_contrastive_loss(t["text_feat"], t["text_feat_m"], queues[1], temp, groups=self.groups)
        momentum = {**params, **jax.lax.stop_gradient(extra["momentum"])}
        image_locals = self.apply(momentum, t["image_tokens_m"], method=FusionModel.image_locals)
        image_locals = fusion.avg_pool_locals(image_locals, self.grid, block.lmi_grid)
        text_locals = self.apply(momentum, t["text_x_m"], method=FusionModel.text_locals)
        lmi_img = fusion.local_mutual_information_loss(t["image_feat"], image_locals,
                                                       np.ones(image_locals.shape[:2], bool), temp, self.groups)
        lmi_txt = fusion.local_mutual_information_loss(t["text_feat"], text_locals, t["keep"][:, 1:], temp,
                                                       self.groups)
        ita = (2.0 * metrics["loss_itc"] + i2i + t2t + lmi_img + lmi_txt) / 6.0
        loss = block.itc_weight * ita + block.itm_weight * metrics["loss_itm"] + block.mlm_weight * metrics["loss_mlm"]
        metrics = {**metrics, "loss_ita": ita, "loss_i2i": i2i, "loss_t2t": t2t, "loss_lmi_image": lmi_img,
                   "loss_lmi_text": lmi_txt}
        return loss, (metrics, {"image_feat_m": t["image_feat_m"], "text_feat_m": t["text_feat_m"]})

    def train_flops_per_example(self) -> float:
        return super().train_flops_per_example()  # the extra terms are small against the encoders
