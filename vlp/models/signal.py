"""A tower for a 1-D signal modality (Symile's third modality): an MLP encoder to an L2-normalised embedding."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlp.models import layers
from vlp.models.two_tower import l2_normalize


class SignalTower(nn.Module):
    """signals [B, T] -> L2-normalised fp32 embeddings [B, embed_dim].

    A linear stem to `width`, `depth` pre-LayerNorm residual MLP blocks (the transformer MLP), a final LayerNorm
    and a linear projection, so the tower has the same building blocks (and logical axes) as the others.
    """

    width: int
    depth: int
    mlp_dim: int
    embed_dim: int
    activation: str = "gelu"
    ln_eps: float = 1e-5
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, signals: jax.Array) -> jax.Array:
        h = layers.Linear((self.width,), (None, "embed"), dtype=self.dtype, name="stem")(signals[:, None, :])
        for i in range(self.depth):
            y = layers.layer_norm(self.ln_eps, self.dtype, name=f"ln_{i}")(h)
            h = h + layers.Mlp(self.mlp_dim, self.activation, self.dtype, name=f"mlp_{i}")(y)
        h = layers.layer_norm(self.ln_eps, self.dtype, name="ln_post")(h)
        out = layers.Linear((self.embed_dim,), ("embed", "proj"), use_bias=False,
                            kernel_init=nn.initializers.lecun_normal(), dtype=self.dtype, name="proj")(h)
        return l2_normalize(out[:, 0])


def signal_forward_flops(length: int, width: int, depth: int, mlp_dim: int, embed_dim: int) -> float:
    """Matmul FLOPs of one example's forward pass through SignalTower."""
    return 2.0 * (length * width + depth * 2 * width * mlp_dim + width * embed_dim)
