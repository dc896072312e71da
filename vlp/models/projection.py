"""XBT's projection psi: a new model's embeddings mapped into an old model's embedding space."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlp.models.layers import Linear, activation_fn

PROJECTION_KINDS = ("mlp", "linear")


class EmbeddingProjection(nn.Module):
    """x [B, D_new] -> L2-normalised [B, D_old] (fp32).

    kind "mlp": Linear(D_new -> hidden_dim), activation, Linear(hidden_dim -> D_old); "linear": one Linear. One
    module serves image and text embeddings alike: both live in the new model's joint space, which is what lets a
    projection pretrained on text alone carry over to images."""

    out_dim: int
    kind: str = "mlp"
    hidden_dim: int = 0
    activation: str = "gelu"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(jnp.float32)
        if self.kind == "mlp":
            x = Linear((self.hidden_dim,), ("embed", "mlp"), name="fc1")(x)
            x = Linear((self.out_dim,), ("mlp", None), name="fc2")(activation_fn(self.activation)(x))
        elif self.kind == "linear":
            x = Linear((self.out_dim,), ("embed", None), name="fc")(x)
        else:
            raise ValueError(f"unknown projection kind {self.kind!r}; valid: {PROJECTION_KINDS}")
        return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
