"""MLCD's model: a ViT, a linear projection to the feature space, and the learnable class centres [K, D]."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlp.models import layers
from vlp.models.two_tower import l2_normalize
from vlp.models.vit import ViT


class ClusterDiscriminator(nn.Module):
    """`__call__(images [B, H, W, C]) -> (features [B, D] L2-normalised fp32, centres [K, D] raw fp32)`.

    The centres carry the logical axes ("classes", None): the `classes` rule shards their rows over fsdp (1M x D
    does not fit replicated); the loss normalises them. `image` holds the `ViT` keyword arguments."""

    image: dict[str, Any]
    embed_dim: int
    num_centres: int
    dtype: jnp.dtype = jnp.float32

    def setup(self) -> None:
        self.image_tower = ViT(**self.image, dtype=self.dtype, name="image")
        self.image_proj = layers.Linear((self.embed_dim,), ("embed", "proj"), use_bias=False,
                                        kernel_init=nn.initializers.lecun_normal(), dtype=self.dtype,
                                        name="image_proj")
        self.centres = self.param("centres", layers.partitioned(nn.initializers.normal(0.01), ("classes", None)),
                                  (self.num_centres, self.embed_dim), jnp.float32)

    def encode_image(self, images: jax.Array) -> jax.Array:
        pooled, _ = self.image_tower(images)
        return l2_normalize(self.image_proj(pooled))

    def patch_tokens(self, images: jax.Array) -> jax.Array:
        """images [B, H, W, C] -> the tower's final patch tokens [B, N, width] (CLS tokens dropped)."""
        _, tokens = self.image_tower(images)
        num_cls = self.image.get("num_cls_tokens", 1) if self.image.get("pool", "cls") == "cls" else 0
        return tokens[:, num_cls:]

    def __call__(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        return self.encode_image(images), self.centres
