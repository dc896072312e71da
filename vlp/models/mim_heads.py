"""Heads of the masked-image and self-distillation objectives: SimMIM's linear pixel head, MAE's light decoder and
the DINO/iBOT projection head. Every param carries logical axis names (sharded like the towers)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlp.models import layers


class PixelHead(nn.Module):
    """SimMIM's head: a linear map of each patch token to its p*p*C pixels (= 1x1 conv + pixel shuffle).

    tokens [B, N, D] -> [B, N, patch_pixels] (fp32)."""

    patch_pixels: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        return layers.Linear((self.patch_pixels,), ("embed", None), dtype=self.dtype, name="proj")(tokens).astype(
            jnp.float32)


class MaeDecoder(nn.Module):
    """MAE's light decoder: visible tokens -> width, mask tokens unshuffled into the full grid, fixed sin-cos
    positions, `depth` pre-LN blocks, LN, linear to pixels.

    tokens [B, num_cls + N_vis, D] (encoder output), keep [B, N_vis] (positions of the visible patches) ->
    [B, N, patch_pixels] (fp32) for every patch of the grid_h x grid_w grid.
    """

    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    grid: tuple[int, int]
    patch_pixels: int
    num_cls: int = 1
    activation: str = "gelu"
    ln_eps: float = 1e-6
    dtype: jnp.dtype = jnp.float32
    scan_layers: bool = False  # as the towers' (model.scan_layers): one param layout for the whole model

    @nn.compact
    def __call__(self, tokens: jax.Array, keep: jax.Array) -> jax.Array:
        b = tokens.shape[0]
        n = self.grid[0] * self.grid[1]
        x = layers.Linear((self.width,), ("embed", "mlp"), dtype=self.dtype, name="embed")(tokens)
        cls, visible = x[:, :self.num_cls], x[:, self.num_cls:]
        token = self.param("mask_token", layers.partitioned(nn.initializers.normal(0.02), (None, None, "mlp")),
                           (1, 1, self.width), jnp.float32)
        full = jnp.broadcast_to(token.astype(x.dtype), (b, n, self.width))
        full = full.at[jnp.arange(b)[:, None], keep].set(visible)  # unshuffle: visible tokens back in place
        full = full + jnp.asarray(layers.sincos_2d(*self.grid, self.width), x.dtype)[None]
        x = jnp.concatenate([cls, full], axis=1)
        x = layers.Encoder(self.depth, self.num_heads, self.mlp_dim, self.activation, self.ln_eps, True, "none",
                           self.dtype, scan=self.scan_layers, name="blocks")(x)
        x = layers.layer_norm(self.ln_eps, self.dtype, "ln")(x)
        pred = layers.Linear((self.patch_pixels,), ("mlp", None), dtype=self.dtype, name="pred")(x[:, self.num_cls:])
        return pred.astype(jnp.float32)


class DinoHead(nn.Module):
    """DINO/iBOT head: MLP (GELU) -> bottleneck -> L2 normalise -> weight-normalised linear to K prototypes
    (weight norm with g fixed to 1: each prototype column has unit norm). x [..., D] -> logits [..., K] (fp32)."""

    hidden: int
    bottleneck: int
    num_prototypes: int
    num_layers: int = 3
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i in range(self.num_layers - 1):
            x = layers.Linear((self.hidden,), ("embed", "mlp"), dtype=self.dtype, name=f"mlp_{i}")(x)
            x = jax.nn.gelu(x, approximate=False)
        x = layers.Linear((self.bottleneck,), ("mlp", None), dtype=self.dtype, name="bottleneck")(x)
        x = x.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.maximum((x * x).sum(-1, keepdims=True), 1e-12))
        v = self.param("prototypes", layers.partitioned(nn.initializers.lecun_normal(), (None, "vocab")),
                       (self.bottleneck, self.num_prototypes), jnp.float32)
        v = v * jax.lax.rsqrt(jnp.maximum((v * v).sum(0, keepdims=True), 1e-12))
        return x @ v
