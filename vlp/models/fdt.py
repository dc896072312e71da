"""FDT (Chen et al., CVPR 2023, "Revisiting Multimodal Representation in Contrastive Learning: From Patch and Token
Embeddings to Finite Discrete Tokens"; github.com/yuxiaochen1103/FDT): both towers' token features are re-expressed
as sparse mixtures of one shared, learnable bank of discrete tokens (methods.md section 14)."""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from vlp.models import layers
from vlp.models.text import TextTransformer
from vlp.models.two_tower import l2_normalize
from vlp.models.vit import ViT


def sparsemax(scores: jax.Array) -> jax.Array:
    """Sparsemax (Martins & Astudillo, 2016) over the last axis: the Euclidean projection of each row onto the
    probability simplex (optax's sort-based `projection_simplex`, vmapped over rows). [..., C] -> [..., C]."""
    flat = scores.reshape(-1, scores.shape[-1]).astype(jnp.float32)
    return jax.vmap(optax.projections.projection_simplex)(flat).reshape(scores.shape)


class QueryHead(nn.Module):
    """FDT's per-modality query MLP: LN -> Linear -> GELU -> LN -> Linear, [B, K, width] -> [B, K, dim]."""

    dim: int
    ln_eps: float = 1e-5
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = layers.layer_norm(self.ln_eps, self.dtype, "ln_in")(x)
        x = layers.Linear((self.dim,), ("embed", "mlp"), dtype=self.dtype, name="fc1")(x)
        x = layers.layer_norm(self.ln_eps, self.dtype, "ln_mid")(nn.gelu(x, approximate=False))
        return layers.Linear((self.dim,), ("mlp", "proj"), dtype=self.dtype, name="fc2")(x)


def bank_embedding(queries: jax.Array, bank: jax.Array, valid: jax.Array | None,
                   temperature: float) -> tuple[jax.Array, jax.Array]:
    """queries [B, K, d], bank [C, d], valid [B, K] (None: all) -> (L2-normalised bag embedding [B, d], sparse
    weights [B, C]). Scores q_k . f_c / sqrt(d); invalid tokens (pads) score 0 (multiplied, as FDT does, not
    -inf); max over tokens, / temperature; sparsemax over the bank; weighted sum of the bank's rows."""
    scores = jnp.einsum("bkd,cd->bkc", queries.astype(jnp.float32), bank) / math.sqrt(bank.shape[-1])
    if valid is not None:
        scores = scores * valid[..., None].astype(scores.dtype)
    weights = sparsemax(jnp.max(scores, axis=1) / temperature)
    return l2_normalize(weights @ bank), weights


class FdtTwoTower(nn.Module):
    """ViT + text transformer whose token features query a shared bank [num_tokens, embed_dim].

    `encode_image(images [B, H, W, C])` / `encode_text(tokens [B, L])` -> L2-normalised [B, embed_dim];
    `__call__` returns both, `logit_scale` (exp of the learnable log, <= logit_scale_max), `logit_bias` (0) and
    the weights' mean support size (`support`, the number of bank tokens a bag uses)."""

    image: dict[str, Any]
    text: dict[str, Any]
    embed_dim: int
    num_tokens: int
    temperature: float = 1000.0
    logit_scale_init: float = 1 / 0.07
    logit_scale_max: float = 100.0
    ln_eps: float = 1e-5
    dtype: Any = jnp.float32

    def setup(self) -> None:
        self.image_tower = ViT(**self.image, dtype=self.dtype, name="image")
        self.text_tower = TextTransformer(**self.text, dtype=self.dtype, name="text")
        self.image_query = QueryHead(self.embed_dim, self.ln_eps, self.dtype, name="image_query")
        self.text_query = QueryHead(self.embed_dim, self.ln_eps, self.dtype, name="text_query")
        self.bank = self.param("fdt_bank", layers.partitioned(nn.initializers.normal(0.02), (None, "proj")),
                               (self.num_tokens, self.embed_dim), jnp.float32)
        self.log_logit_scale = self.param(
            "log_logit_scale", nn.initializers.constant(math.log(self.logit_scale_init)), (), jnp.float32)

    def image_bag(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        _, tokens = self.image_tower(images)
        return bank_embedding(self.image_query(tokens), self.bank, None, self.temperature)

    def text_bag(self, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
        _, features = self.text_tower(tokens)
        return bank_embedding(self.text_query(features), self.bank, tokens != self.text["pad_id"], self.temperature)

    def encode_image(self, images: jax.Array) -> jax.Array:
        return self.image_bag(images)[0]

    def encode_text(self, tokens: jax.Array) -> jax.Array:
        return self.text_bag(tokens)[0]

    def __call__(self, images: jax.Array, tokens: jax.Array) -> dict[str, jax.Array]:
        image_emb, image_w = self.image_bag(images)
        text_emb, text_w = self.text_bag(tokens)
        support = 0.5 * (jnp.mean(jnp.sum(image_w > 0, -1)) + jnp.mean(jnp.sum(text_w > 0, -1)))
        return {"image_emb": image_emb, "text_emb": text_emb,
                "logit_scale": jnp.minimum(jnp.exp(self.log_logit_scale), self.logit_scale_max),
                "logit_bias": jnp.zeros((), jnp.float32), "support": support.astype(jnp.float32)}
