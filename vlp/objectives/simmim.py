"""SimMIM (Xie et al., 2022): a learned mask token replaces masked patch embeddings; a linear head predicts the
raw (normalised-image) pixels; L1 on the masked pixels only."""

from __future__ import annotations

from typing import Any

import jax

from vlp.losses.mim import patchify, simmim_l1
from vlp.models import flops
from vlp.models.masked import SimMim
from vlp.objectives import register
from vlp.objectives.base import Metrics, resolve_compute_dtype
from vlp.objectives.masked_image import ImageOnlyObjective


@register("simmim")
class SimMimObjective(ImageOnlyObjective):
    """loss = mean |x̂ - x| over masked pixels (x: the image in [-1, 1], no per-patch normalisation)."""

    def __init__(self, config):
        super().__init__(config)
        self.model = SimMim(self.image_kwargs, dtype=resolve_compute_dtype(config.precision.compute_dtype))

    def init(self, rng: jax.Array) -> Any:
        batch = self.example_batch(1)
        return self.model.init(rng, batch["image"], batch["mim_mask"])["params"]

    def loss_fn(self, params: Any, batch: dict[str, jax.Array], rng: jax.Array) -> tuple[jax.Array, Metrics]:
        del rng
        pred = self.model.apply({"params": params}, batch["image"], batch["mim_mask"])
        loss = simmim_l1(pred, patchify(batch["image"], self.patch_size), batch["mim_mask"])
        return loss, {"loss_reconstruction": loss}

    def train_flops_per_example(self) -> float:
        k = self.image_kwargs
        forward = flops.vit_forward_flops(self.config.data.image_size, k["patch_size"], k["width"], k["depth"],
                                          k["mlp_dim"], k["num_cls_tokens"], k["pool"])
        forward += 2 * self.grid[0] * self.grid[1] * k["width"] * k["patch_size"] ** 2 * 3
        return 3.0 * forward
