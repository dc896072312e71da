"""Two-tower image-text model: ViT + text transformer + linear projections + learnable logit scale (and bias)."""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlp.models import layers
from vlp.models.text import TextTransformer
from vlp.models.vit import ViT

# How the learnable temperature is stored: CLIP keeps log(t) ("log"); ALIGN's reference port divides by a
# temperature T initialised to 1.0 ("temperature"). Both give the multiplier t = logit_scale.
SCALE_PARAMETERIZATIONS = ("log", "temperature")


def l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """Normalises the last axis in fp32 (contrastive logits are computed in fp32)."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))


class TwoTower(nn.Module):
    """CLIP/ALIGN/SigLIP dual encoder.

    `encode_image(images [B, H, W, C]) -> [B, D]` and `encode_text(tokens [B, L]) -> [B, D]` return
    L2-normalised fp32 embeddings; `__call__` returns both plus `logit_scale` (the multiplier t, a scalar) and
    `logit_bias` (a scalar, 0.0 when the model has no bias parameter). `patch_keep` [B, K] (training with FLIP
    patch dropout): the patch tokens each image keeps (`vlp.models.vit.patch_dropout_keep`).
    `image` and `text` hold the keyword arguments of `ViT` and `TextTransformer`. `embed_dim=None` drops the
    projection of that tower (SigLIP's image side feeds the MAP head output directly).
    """

    image: dict[str, Any]
    text: dict[str, Any]
    embed_dim: int | None
    image_projection: bool = True
    text_projection: bool = True
    projection_bias: bool = False
    logit_scale_init: float = 1 / 0.07
    logit_scale_max: float = 100.0
    logit_scale_parameterization: str = "log"
    logit_bias_init: float | None = None
    dtype: jnp.dtype = jnp.float32

    def setup(self) -> None:
        if self.logit_scale_parameterization not in SCALE_PARAMETERIZATIONS:
            raise ValueError(f"unknown logit_scale_parameterization {self.logit_scale_parameterization!r}; "
                             f"valid: {SCALE_PARAMETERIZATIONS}")
        self.image_tower = ViT(**self.image, dtype=self.dtype, name="image")
        self.text_tower = TextTransformer(**self.text, dtype=self.dtype, name="text")
        proj = lambda name: layers.Linear(  # noqa: E731
            (self.embed_dim,), ("embed", "proj"), use_bias=self.projection_bias,
            kernel_init=nn.initializers.lecun_normal(), dtype=self.dtype, name=name)
        self.image_proj = proj("image_proj") if self.image_projection else None
        self.text_proj = proj("text_proj") if self.text_projection else None
        if self.logit_scale_parameterization == "log":
            self.log_logit_scale = self.param(
                "log_logit_scale", nn.initializers.constant(math.log(self.logit_scale_init)), (), jnp.float32)
        else:
            self.temperature = self.param(
                "temperature", nn.initializers.constant(1.0 / self.logit_scale_init), (), jnp.float32)
        if self.logit_bias_init is not None:
            self.bias = self.param("logit_bias", nn.initializers.constant(self.logit_bias_init), (), jnp.float32)

    def encode_image(self, images: jax.Array, patch_keep: jax.Array | None = None) -> jax.Array:
        pooled, _ = self.image_tower(images, keep=patch_keep)
        if self.image_proj is not None:
            pooled = self.image_proj(pooled)
        return l2_normalize(pooled)

    def patch_tokens(self, images: jax.Array) -> jax.Array:
        """images [B, H, W, C] -> the image tower's final patch tokens [B, N, width] (CLS tokens dropped)."""
        _, tokens = self.image_tower(images)
        num_cls = self.image.get("num_cls_tokens", 1) if self.image.get("pool", "cls") == "cls" else 0
        return tokens[:, num_cls:]

    def aligned_patch_tokens(self, images: jax.Array) -> jax.Array:
        """images [B, H, W, C] -> patch tokens in the image-text space [B, N, embed_dim]: the tower's patch tokens
        after its final LayerNorm (`ln_post`, applied to every token in ViT) through the image projection, as the
        pooled token is (CLIP's `ln_post(x) @ proj`); not L2-normalised. Without a projection: `patch_tokens`."""
        tokens = self.patch_tokens(images)
        return self.image_proj(tokens) if self.image_proj is not None else tokens

    def encode_text(self, tokens: jax.Array, token_embeds: jax.Array | None = None) -> jax.Array:
        pooled, _ = self.text_tower(tokens, token_embeds)
        if self.text_proj is not None:
            pooled = self.text_proj(pooled)
        return l2_normalize(pooled)

    def logit_scale(self) -> jax.Array:
        if self.logit_scale_parameterization == "log":
            return jnp.minimum(jnp.exp(self.log_logit_scale), self.logit_scale_max)
        # Bounding T from below keeps the multiplier positive and <= logit_scale_max.
        return 1.0 / jnp.maximum(self.temperature, 1.0 / self.logit_scale_max)

    def logit_bias(self) -> jax.Array:
        return self.bias if self.logit_bias_init is not None else jnp.zeros((), jnp.float32)

    def __call__(self, images: jax.Array, tokens: jax.Array,
                 patch_keep: jax.Array | None = None) -> dict[str, jax.Array]:
        return {
            "image_emb": self.encode_image(images, patch_keep),
            "text_emb": self.encode_text(tokens),
            "logit_scale": self.logit_scale(),
            "logit_bias": self.logit_bias(),
        }
