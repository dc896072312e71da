"""Attentional pooler and the captioning text decoder of CoCa / CapPa (linen), with an explicit KV cache.

The decoder reads tokens [B, L] (vlp's convention: pieces, eos, pad = 0) and predicts each token from the ones
before it: position 0 reads a learned begin embedding (no new token id), position p reads token p-1. It is split
into `n_uni` unimodal layers (causal self-attention only; CoCa appends a learned CLS at the end of the text, whose
output after LN is the text embedding) and `n_multi` multimodal layers (causal self-attention + cross-attention to
image tokens), then LN and a vocab head (tied to the token embedding or not).

Generation calls `decode_step` one position at a time with a cache of every layer's keys and values
(`init_cache`), so a step costs O(L) instead of O(L^2); the cross-attention keys and values of the image tokens are
computed once (`cross_kv`).

`layout="open_clip"` builds open_clip's CoCa decoder (open_clip/coca_model.py, transformer.py) so weights map one
to one: position 0 reads the token `bos_id` (open_clip's start-of-text) instead of a learned begin embedding, the
unimodal layers mask padding keys for every row (`cls_mask` "correct", or "legacy": open_clip's original CLS mask,
shifted by one position, that its pretrained CoCa weights were trained with), each multimodal layer is a causal
self-attention block followed by a separate cross-attention block (each with its own MLP; the image tokens get
their own LN per layer) and the vocab head has no bias.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlp.models import layers

Cache = list[tuple[jax.Array, jax.Array]]  # per layer (keys, values) [B, L, heads, head_dim]


class MultiHeadAttention(nn.Module):
    """Attention of queries x [B, T, width] over keys/values from `kv(context [B, S, C])` -> [B, T, width]."""

    width: int
    num_heads: int
    dtype: Any = jnp.float32

    def setup(self) -> None:
        if self.width % self.num_heads:
            raise ValueError(f"attention width {self.width} is not divisible by num_heads {self.num_heads}")
        head_dim = self.width // self.num_heads
        dense = lambda name: layers.Linear(  # noqa: E731
            (self.num_heads, head_dim), ("embed", "heads", "kv"), dtype=self.dtype, name=name)
        self.query, self.key, self.value = dense("query"), dense("key"), dense("value")
        self.out = layers.Linear((self.width,), ("heads", "kv", "embed"), num_in_axes=2, dtype=self.dtype,
                                 name="out")

    def kv(self, context: jax.Array) -> tuple[jax.Array, jax.Array]:
        return self.key(context), self.value(context)

    def attend(self, x: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """mask: bool broadcastable to [B, heads, T, S] (True = attend)."""
        q = self.query(x)
        return self.out(jax.nn.dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype), mask=mask))

    def __call__(self, x: jax.Array, context: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        return self.attend(x, *self.kv(context), mask)


class AttentionPooler(nn.Module):
    """CoCa's attentional pooler: `num_queries` learned queries, one multi-head cross-attention layer over the
    (layer-normed) tokens, then LN. tokens [B, N, C] -> [B, num_queries, width]."""

    num_queries: int
    width: int
    num_heads: int
    ln_eps: float = 1e-5
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        queries = self.param("queries", layers.partitioned(nn.initializers.normal(0.02), (None, "embed")),
                             (self.num_queries, self.width), jnp.float32)
        q = layers.layer_norm(self.ln_eps, self.dtype, "ln_q")(queries.astype(self.dtype))
        q = jnp.broadcast_to(q[None], (tokens.shape[0], *q.shape))
        context = layers.layer_norm(self.ln_eps, self.dtype, "ln_k")(tokens)
        out = MultiHeadAttention(self.width, self.num_heads, self.dtype, name="attn")(q, context)
        return layers.layer_norm(self.ln_eps, self.dtype, "ln_post")(out)


class DecoderBlock(nn.Module):
    """Pre-LN block: x + self_attn(ln(x)); [x + cross_attn(ln(x), image)]; x + mlp(ln(x)). [B, T, D] -> [B, T, D].

    With `cache` (keys/values [B, L, heads, head_dim] of all positions) the new keys/values of x are written at
    `index` and attention reads the whole cache (masked by `mask`); the updated cache is returned."""

    width: int
    num_heads: int
    mlp_dim: int
    cross: bool
    activation: str = "gelu"
    ln_eps: float = 1e-5
    dtype: Any = jnp.float32

    def setup(self) -> None:
        self.ln_1 = layers.layer_norm(self.ln_eps, self.dtype, "ln_1")
        self.attn = MultiHeadAttention(self.width, self.num_heads, self.dtype, name="attn")
        if self.cross:
            self.ln_cross = layers.layer_norm(self.ln_eps, self.dtype, "ln_cross")
            self.cross_attn = MultiHeadAttention(self.width, self.num_heads, self.dtype, name="cross_attn")
        self.ln_2 = layers.layer_norm(self.ln_eps, self.dtype, "ln_2")
        self.mlp = layers.Mlp(self.mlp_dim, self.activation, self.dtype, name="mlp")

    def cross_kv(self, context: jax.Array) -> tuple[jax.Array, jax.Array]:
        return self.cross_attn.kv(context)

    def __call__(self, x: jax.Array, mask: jax.Array, cross_kv: tuple[jax.Array, jax.Array] | None = None,
                 cache: tuple[jax.Array, jax.Array] | None = None, index: jax.Array | None = None
                 ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        x = layers.constrain(x, ("batch", "length", "embed"))
        y = self.ln_1(x)
        k, v = self.attn.kv(y)
        if cache is not None:
            start = (0, index, 0, 0)
            k = jax.lax.dynamic_update_slice(cache[0], k.astype(cache[0].dtype), start)
            v = jax.lax.dynamic_update_slice(cache[1], v.astype(cache[1].dtype), start)
            cache = (k, v)
        x = x + self.attn.attend(y, k, v, mask)
        if self.cross:
            x = x + self.cross_attn.attend(self.ln_cross(x), *cross_kv)
        x = x + self.mlp(self.ln_2(x))
        return layers.constrain(x, ("batch", "length", "embed")), cache


class CrossAttentionBlock(nn.Module):
    """open_clip's cross-attention block: x + attn(ln_1(x), ln_1_kv(image)); x + mlp(ln_2(x)). [B, T, D]."""

    width: int
    num_heads: int
    mlp_dim: int
    activation: str = "gelu"
    ln_eps: float = 1e-5
    dtype: Any = jnp.float32

    def setup(self) -> None:
        self.ln_1 = layers.layer_norm(self.ln_eps, self.dtype, "ln_1")
        self.ln_1_kv = layers.layer_norm(self.ln_eps, self.dtype, "ln_1_kv")
        self.attn = MultiHeadAttention(self.width, self.num_heads, self.dtype, name="attn")
        self.ln_2 = layers.layer_norm(self.ln_eps, self.dtype, "ln_2")
        self.mlp = layers.Mlp(self.mlp_dim, self.activation, self.dtype, name="mlp")

    def cross_kv(self, context: jax.Array) -> tuple[jax.Array, jax.Array]:
        return self.attn.kv(self.ln_1_kv(context))

    def __call__(self, x: jax.Array, cross_kv: tuple[jax.Array, jax.Array]) -> jax.Array:
        x = x + self.attn.attend(self.ln_1(x), *cross_kv)
        x = x + self.mlp(self.ln_2(x))
        return layers.constrain(x, ("batch", "length", "embed"))


LAYOUTS = ("vlp", "open_clip")
CLS_MASKS = ("correct", "legacy")


class TextDecoder(nn.Module):
    """tokens [B, L] (+ image tokens [B, S, C]) -> (CLS text feature [B, D] or None, logits [B, L, vocab]).

    `embed_cls` (CoCa) appends the learned CLS after the L inputs; its attention row sees the begin embedding, the
    non-pad inputs and itself, so padding never reaches it. `mask_token` (CapPa's parallel prediction) adds a
    learned embedding that replaces every input of the rows flagged in `masked`, which then attend bidirectionally.
    """

    vocab_size: int
    max_len: int
    width: int
    num_heads: int
    mlp_dim: int
    n_uni: int
    n_multi: int
    pad_id: int = 0
    embed_cls: bool = False
    mask_token: bool = False
    tied_embedding: bool = False
    layout: str = "vlp"  # LAYOUTS; "open_clip" needs bos_id
    bos_id: int | None = None
    cls_mask: str = "legacy"  # CLS_MASKS (open_clip layout only)
    remat_policy: str = "none"  # layers.REMAT_POLICIES: what each block keeps for the backward pass
    activation: str = "gelu"
    ln_eps: float = 1e-5
    dtype: Any = jnp.float32

    def setup(self) -> None:
        if self.layout not in LAYOUTS or self.cls_mask not in CLS_MASKS:
            raise ValueError(f"decoder layout={self.layout!r}, cls_mask={self.cls_mask!r}; valid: {LAYOUTS}, "
                             f"{CLS_MASKS}")
        open_clip = self.layout == "open_clip"
        if open_clip and not (self.bos_id is not None and 0 <= self.bos_id < self.vocab_size
                              and self.bos_id != self.pad_id):
            raise ValueError(f"the open_clip decoder layout reads a start token: bos_id={self.bos_id!r} must be a "
                             f"token id in [0, {self.vocab_size}) other than the padding id {self.pad_id}")
        init = lambda names: layers.partitioned(nn.initializers.normal(0.02), names)  # noqa: E731
        self.token_embed = self.param("token_embed", init(("vocab", "embed")), (self.vocab_size, self.width),
                                      jnp.float32)
        if not open_clip:
            self.bos_embed = self.param("bos_embed", init(("embed",)), (self.width,), jnp.float32)
        self.pos_embed = self.param("pos_embed", layers.partitioned(nn.initializers.normal(0.01), ("length", "embed")),
                                    (self.max_len + int(self.embed_cls), self.width), jnp.float32)
        if self.embed_cls:
            self.cls_embed = self.param("cls_embed", init(("embed",)), (self.width,), jnp.float32)
            self.ln_cls = layers.layer_norm(self.ln_eps, self.dtype, "ln_cls")
        if self.mask_token:
            self.mask_embed = self.param("mask_embed", init(("embed",)), (self.width,), jnp.float32)
        remat = (lambda cls: cls) if self.remat_policy == "none" else (  # noqa: E731
            lambda cls: nn.remat(cls, policy=layers.remat_policy_fn(self.remat_policy)))
        block = lambda cross, name: remat(DecoderBlock)(  # noqa: E731
            self.width, self.num_heads, self.mlp_dim, cross, self.activation, self.ln_eps, self.dtype, name=name)
        self.blocks = [block(False, f"uni_{i}") for i in range(self.n_uni)] + [
            block(not open_clip, f"multi_{i}") for i in range(self.n_multi)]
        if open_clip:
            self.cross_blocks = [remat(CrossAttentionBlock)(self.width, self.num_heads, self.mlp_dim, self.activation,
                                                     self.ln_eps, self.dtype, name=f"cross_{i}")
                                 for i in range(self.n_multi)]
        self.ln_final = layers.layer_norm(self.ln_eps, self.dtype, "ln_final")
        if not self.tied_embedding:
            # Small init (as the tied table's): the caption loss starts at ln(vocab), a uniform prediction.
            self.head = layers.Linear((self.vocab_size,), ("embed", "vocab"), use_bias=not open_clip,
                                      kernel_init=nn.initializers.normal(0.02), dtype=self.dtype, name="head")

    def _table(self) -> jax.Array:
        # A replicated copy for the lookup (see TextTransformer: gathering from an FSDP-sharded table is slow).
        return layers.constrain(self.token_embed.astype(self.dtype), (None, None))

    def _logits(self, x: jax.Array) -> jax.Array:
        x = self.ln_final(x)
        if self.tied_embedding:
            return jnp.einsum("bld,vd->blv", x, self.token_embed.astype(self.dtype)).astype(jnp.float32)
        return self.head(x).astype(jnp.float32)

    def cross_kv(self, context: jax.Array) -> list[tuple[jax.Array, jax.Array]]:
        """Keys/values of the image tokens [B, S, C] for each multimodal layer (computed once per image)."""
        if self.layout == "open_clip":
            return [blk.cross_kv(context) for blk in self.cross_blocks]
        return [blk.cross_kv(context) for blk in self.blocks[self.n_uni:]]

    def _bos(self) -> jax.Array:
        """The begin input [width]: a learned embedding, or (open_clip) the start token's row of the table."""
        if self.layout == "open_clip":
            return self.token_embed[self.bos_id].astype(self.dtype)
        return self.bos_embed.astype(self.dtype)

    def _multimodal(self, j: int, x: jax.Array, mask: jax.Array, kv: tuple[jax.Array, jax.Array],
                    cache: tuple[jax.Array, jax.Array] | None = None, index: jax.Array | None = None
                    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        x, cache = self.blocks[self.n_uni + j](x, mask, kv, cache, index)
        if self.layout == "open_clip":
            x = self.cross_blocks[j](x, kv)
        return x, cache

    def __call__(self, tokens: jax.Array, context: jax.Array | None,
                 masked: jax.Array | None = None) -> tuple[jax.Array | None, jax.Array | None]:
        """Teacher-forced pass. `context` None skips the multimodal layers and the head (text embedding only)."""
        batch, length = tokens.shape
        if length > self.max_len:
            raise ValueError(f"text length {length} exceeds the decoder's max_len {self.max_len}")
        prev = jnp.take(self._table(), tokens[:, :-1], axis=0)
        x = jnp.concatenate([jnp.broadcast_to(self._bos(), (batch, 1, self.width)), prev], 1)
        pos = self.pos_embed.astype(self.dtype)
        if masked is not None:
            x = jnp.where(masked[:, None, None], self.mask_embed.astype(self.dtype)[None, None], x)
        x = x + pos[None, :length]
        mask = jnp.broadcast_to(jnp.tril(jnp.ones((length, length), bool)), (batch, 1, length, length))
        if masked is not None:  # parallel prediction: mask tokens carry no content, so they may see both ways
            mask = mask | masked[:, None, None, None]
        multi_mask = mask
        if self.embed_cls:
            # The CLS has its own position (the table's last row), so its output does not depend on how far the
            # text is padded.
            cls = self.cls_embed.astype(self.dtype) + pos[self.max_len]
            x = jnp.concatenate([x, jnp.broadcast_to(cls, (batch, 1, self.width))], axis=1)
            # Input p (p >= 1) holds token p-1: the CLS row sees the begin embedding, non-pad inputs and itself.
            valid = jnp.concatenate([jnp.ones((batch, 1), bool), tokens[:, :-1] != self.pad_id,
                                     jnp.ones((batch, 1), bool)], axis=1)
            mask = jnp.concatenate([mask, jnp.zeros((batch, 1, length, 1), bool)], axis=3)
            mask = jnp.concatenate([mask, valid[:, None, None, :]], axis=2)
            if self.layout == "open_clip":
                # open_clip's text tower masks padding keys for every row (its legacy mask shifted by one position);
                # its multimodal layers are plainly causal.
                keys = valid if self.cls_mask == "correct" else jnp.concatenate(
                    [jnp.ones((batch, 1), bool), valid[:, :-1]], axis=1)
                mask = jnp.tril(jnp.ones((length + 1, length + 1), bool))[None, None] & keys[:, None, None, :]
        for blk in self.blocks[:self.n_uni]:
            x, _ = blk(x, mask)
        cls_feature = None
        if self.embed_cls:
            cls_feature, x = self.ln_cls(x[:, -1]), x[:, :-1]
        if context is None:
            return cls_feature, None
        for j, kv in enumerate(self.cross_kv(context)):
            x, _ = self._multimodal(j, x, multi_mask, kv)
        return cls_feature, self._logits(x)

    def decode_step(self, prev_token: jax.Array, index: jax.Array, cache: Cache,
                    cross_kv: list[tuple[jax.Array, jax.Array]]) -> tuple[jax.Array, Cache]:
        """One generation step at position `index`: prev_token [B] is the token at index-1 (ignored at 0, where the
        begin embedding is read). Returns logits [B, vocab] (fp32) and the cache with this position written."""
        emb = jnp.take(self._table(), prev_token, axis=0)
        x = jnp.where(index == 0, self._bos()[None], emb)
        x = (x + jax.lax.dynamic_index_in_dim(self.pos_embed.astype(self.dtype), index, keepdims=False))[:, None]
        length = cache[0][0].shape[1]
        mask = (jnp.arange(length) <= index)[None, None, None, :]
        new_cache = []
        for i, blk in enumerate(self.blocks):
            if i >= self.n_uni:
                x, layer_cache = self._multimodal(i - self.n_uni, x, mask, cross_kv[i - self.n_uni], cache[i], index)
            else:
                x, layer_cache = blk(x, mask, None, cache[i], index)
            new_cache.append(layer_cache)
        return self._logits(x)[:, 0], new_cache


def init_cache(batch: int, length: int, depth: int, width: int, num_heads: int, dtype: Any = jnp.float32) -> Cache:
    """Zero keys/values [batch, length, heads, head_dim] for each of `depth` decoder layers."""
    shape = (batch, length, num_heads, width // num_heads)
    return [(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(depth)]
