"""MAE (He et al., 2022): the encoder sees only the visible patches (+ CLS); a light decoder fills in mask tokens
and predicts per-patch normalised pixels; MSE on the masked patches."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from vlp.data.masking import num_masked
from vlp.losses.mim import mae_mse, patchify
from vlp.models import flops
from vlp.models.masked import Mae
from vlp.objectives import register
from vlp.objectives.base import Metrics, resolve_compute_dtype
from vlp.objectives.masked_image import ImageOnlyObjective


@register("mae")
class MaeObjective(ImageOnlyObjective):
    """loss = (1/|M|) sum_{p in M} mean_d (x̂_p - norm(x_p))^2."""

    def __init__(self, config):
        super().__init__(config)
        if config.mim.masked_image_fraction != 1.0:
            raise ValueError(f"invalid config: objective='mae' needs mim.masked_image_fraction=1.0 (every image "
                             f"keeps the same number of visible patches), got {config.mim.masked_image_fraction}")
        mim = config.mim
        self.decoder = dict(width=mim.decoder_width, depth=mim.decoder_depth, num_heads=mim.decoder_heads,
                            mlp_dim=mim.decoder_mlp_dim, scan_layers=config.model.scan_layers)
        self.model = Mae(self.image_kwargs, self.decoder, self.grid,
                         dtype=resolve_compute_dtype(config.precision.compute_dtype))
        n = self.grid[0] * self.grid[1]
        self.num_visible = n - num_masked(n, mim.mask_ratio)

    def keep_indices(self, mask: jax.Array) -> jax.Array:
        """mask [B, N] bool -> positions of the visible patches [B, N_vis], in grid order."""
        return jnp.argsort(mask, axis=1, stable=True)[:, :self.num_visible].astype(jnp.int32)

    def init(self, rng: jax.Array) -> Any:
        batch = self.example_batch(1)
        return self.model.init(rng, batch["image"], self.keep_indices(jnp.asarray(batch["mim_mask"])))["params"]

    def loss_fn(self, params: Any, batch: dict[str, jax.Array], rng: jax.Array) -> tuple[jax.Array, Metrics]:
        del rng
        pred = self.model.apply({"params": params}, batch["image"], self.keep_indices(batch["mim_mask"]))
        loss = mae_mse(pred, patchify(batch["image"], self.patch_size), batch["mim_mask"], self.config.mim.norm_pix)
        return loss, {"loss_reconstruction": loss}

    def train_flops_per_example(self) -> float:
        k, d, n = self.image_kwargs, self.decoder, self.grid[0] * self.grid[1]
        tokens = self.num_visible + (k["num_cls_tokens"] if k["pool"] == "cls" else 0)
        forward = 2 * n * k["patch_size"] ** 2 * 3 * k["width"]
        forward += flops.encoder_forward_flops(tokens, k["width"], k["depth"], k["mlp_dim"])
        forward += flops.encoder_forward_flops(n + 1, d["width"], d["depth"], d["mlp_dim"])
        forward += 2 * n * d["width"] * k["patch_size"] ** 2 * 3
        return 3.0 * forward
