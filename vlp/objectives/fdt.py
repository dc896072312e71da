"""FDT: CLIP's InfoNCE on bag-of-discrete-token embeddings (a shared learnable token bank, per-modality query
heads, max-pooled scores, sparsemax weights); see vlp.models.fdt and methods.md section 14."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from vlp.data.tokenizer import load_tokenizer
from vlp.models import flops
from vlp.models.fdt import FdtTwoTower
from vlp.objectives import register
from vlp.objectives.base import Metrics, Objective, resolve_compute_dtype
from vlp.objectives.two_tower import TwoTowerObjective, image_tower_kwargs, text_tower_kwargs


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(f"invalid config: {message}")


@register("fdt")
class FdtObjective(TwoTowerObjective):
    """loss = InfoNCE_sym(e_img, e_txt, t), e = L2norm(sparsemax(max_k q_k F^T / sqrt(d) / T) F), t <= 100."""

    supports_patch_dropout = False
    encode_patches = None  # bag embeddings only: no patch tokens in the shared space
    encode_aligned_patches = None

    @classmethod
    def default_config(cls) -> dict[str, Any]:
        return dict(
            num_tokens=16384,  # C, the bank size (FDT's released configs)
            temperature=1000.0,  # sd_temperature T, constant in the released config (decay weight 1)
        )

    @classmethod
    def validate_config(cls, config: ml_collections.ConfigDict) -> None:
        block = config.fdt
        _check(isinstance(block.num_tokens, int) and block.num_tokens >= 2,
               f"fdt.num_tokens={block.num_tokens!r} must be an int >= 2")
        _check(block.temperature > 0, f"fdt.temperature={block.temperature!r} must be > 0")
        _check(bool(config.model.embed_dim), f"model.embed_dim={config.model.embed_dim!r}: FDT needs the bank "
               "width (an int >= 1)")

    def __init__(self, config: ml_collections.ConfigDict):
        Objective.__init__(self, config)
        self.tokenizer = load_tokenizer(config.data.tokenizer or None)
        m = config.model
        self.model = FdtTwoTower(
            image=image_tower_kwargs(m), text=text_tower_kwargs(m, self.tokenizer, config.data.max_text_len),
            embed_dim=m.embed_dim, num_tokens=config.fdt.num_tokens, temperature=config.fdt.temperature,
            logit_scale_init=m.logit_scale_init, logit_scale_max=m.logit_scale_max, ln_eps=m.ln_eps,
            dtype=resolve_compute_dtype(config.precision.compute_dtype))
        self.patch_dropout, self.patch_dropout_until_step = 0.0, None
        num_patches = (config.data.image_size // self.model.image["patch_size"]) ** 2
        self.num_patches = self.num_kept_patches = num_patches

    def embed(self, params: Any, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        return self.model.apply({"params": params}, batch["image"], batch["text"])

    def loss_fn(self, params: Any, batch: dict[str, jax.Array], rng: jax.Array) -> tuple[jax.Array, Metrics]:
        del rng
        out = self.embed(params, batch)
        loss, metrics = self.loss_from_embeddings(out)
        # The bank tokens a bag uses (methods.md: watch that the support grows).
        return loss, dict(metrics, fdt_support=out["support"])

    def encode_image(self, params: Any, images: jax.Array) -> jax.Array:
        return self.model.apply({"params": params}, images, method=FdtTwoTower.encode_image)

    def encode_text(self, params: Any, tokens: jax.Array) -> jax.Array:
        return self.model.apply({"params": params}, tokens, method=FdtTwoTower.encode_text)

    def train_flops_per_example(self) -> float:
        """Both towers, both query heads, the [tokens, C] score matrices and the bag sums, x3 (fwd + bwd)."""
        image, text, d, c = self.model.image, self.model.text, self.model.embed_dim, self.model.num_tokens
        forward = flops.vit_forward_flops(self.config.data.image_size, image["patch_size"], image["width"],
                                          image["depth"], image["mlp_dim"], image["num_cls_tokens"], image["pool"])
        forward += flops.text_forward_flops(text["max_len"], text["width"], text["depth"], text["mlp_dim"],
                                            text["causal"])
        image_tokens = self.num_patches + image["num_cls_tokens"]
        forward += 2.0 * (image_tokens * (image["width"] * d + d * d) + text["max_len"] * (text["width"] * d + d * d))
        forward += 2.0 * (image_tokens + text["max_len"]) * c * d + 2 * 2.0 * c * d
        forward += flops.contrastive_logits_forward_flops(self.config.batch_size, d)
        return 3.0 * forward
