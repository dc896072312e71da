"""Text transformer tower (linen): token + position embedding -> pre-LN blocks -> ln_final -> pool."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlp.models import layers

TEXT_POOLINGS = ("eot", "last", "mean")


def pool_text(tokens: jax.Array, x: jax.Array, pool: str, eos_id: int, pad_id: int) -> jax.Array:
    """Pools token features x [B, L, D] of ids `tokens` [B, L] into [B, D].

    `eot`: the first end-of-text token (CLIP; with eos = the highest id this equals open_clip's argmax pooling);
    `last`: the last position (SigLIP); `mean`: the mean over non-padding positions.
    """
    if pool == "eot":
        is_eos = tokens == eos_id
        # A row without eos (truncated without one) pools its last position rather than position 0.
        index = jnp.where(is_eos.any(axis=1), jnp.argmax(is_eos, axis=1), tokens.shape[1] - 1)
        return jnp.take_along_axis(x, index[:, None, None], axis=1)[:, 0]
    if pool == "last":
        return x[:, -1]
    if pool == "mean":
        keep = (tokens != pad_id).astype(x.dtype)[..., None]
        return (x * keep).sum(axis=1) / jnp.maximum(keep.sum(axis=1), 1.0)
    raise ValueError(f"unknown text pooling {pool!r}; valid: {TEXT_POOLINGS}")


class TextTransformer(nn.Module):
    """tokens [B, L] int32 -> (pooled [B, width], token features [B, L, width]).

    `causal=True` is CLIP's text encoder (each position sees only earlier ones, so padding after the eot token
    never reaches the pooled feature); `causal=False` is bidirectional, with a padding mask unless
    `padding_mask=False` (Hugging Face SigLIP attends to the padding too, and its weights were trained so).
    """

    vocab_size: int
    max_len: int
    width: int
    depth: int
    mlp_dim: int
    num_heads: int
    eos_id: int
    pad_id: int = 0
    causal: bool = True
    padding_mask: bool = True
    pool: str = "eot"
    activation: str = "gelu"
    ln_eps: float = 1e-5
    fused_qkv: bool = True
    remat_policy: str = "none"  # layers.REMAT_POLICIES
    scan_layers: bool = False  # blocks under nn.scan (params encoder/blocks/..., a leading [depth] axis)
    attention: str = "auto"  # layers.ATTENTION_IMPLEMENTATIONS
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens: jax.Array, token_embeds: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """`token_embeds` [B, L, width] (optional) replace the table lookup of `tokens`, which then only place the
        pooling and padding mask (prompt learning feeds learned context vectors this way)."""
        batch, length = tokens.shape
        if length > self.max_len:
            raise ValueError(f"text length {length} exceeds the tower's max_len {self.max_len}")
        embed = nn.Embed(self.vocab_size, self.width, dtype=self.dtype, param_dtype=jnp.float32,
                         embedding_init=layers.partitioned(nn.initializers.normal(0.02), ("vocab", "embed")),
                         name="token_embed")
        pos = self.param("pos_embed", layers.partitioned(nn.initializers.normal(0.01), ("length", "embed")),
                         (self.max_len, self.width), jnp.float32)
        # Look up in a replicated copy of the table: gathering rows of an FSDP-sharded table into batch-sharded
        # activations makes XLA rematerialise the whole gradient; the all-gather here is what FSDP does anyway.
        table = layers.constrain(embed.embedding.astype(self.dtype), (None, None))
        x = jnp.take(table, tokens, axis=0) if token_embeds is None else token_embeds.astype(self.dtype)
        x = x + pos[:length].astype(self.dtype)[None]
        mask = None
        if not self.causal and self.padding_mask:
            mask = (tokens != self.pad_id)[:, None, None, :]
        x = layers.Encoder(self.depth, self.num_heads, self.mlp_dim, self.activation, self.ln_eps, self.fused_qkv,
                           self.remat_policy, self.dtype, self.attention, scan=self.scan_layers,
                           name="encoder")(x, mask, self.causal)
        x = layers.layer_norm(self.ln_eps, self.dtype, "ln_final")(x)
        return pool_text(tokens, x, self.pool, self.eos_id, self.pad_id), x
