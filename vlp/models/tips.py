"""TIPS model: a ViT with two CLS tokens (CLS 1 <-> noisy caption, CLS 2 <-> synthetic caption) and a mask token,
one text tower for both captions, per-CLS projections, a learnable temperature and a DINO/iBOT head shared by the
CLS (DINO) and patch (iBOT) tokens."""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlp.models import layers
from vlp.models.mim_heads import DinoHead
from vlp.models.text import TextTransformer
from vlp.models.two_tower import l2_normalize
from vlp.models.vit import ViT

NUM_CLS = 2


class Tips(nn.Module):
    """`image_tokens(images [B,H,W,3], mask [B,N] | None) -> [B, 2 + N, width]`; `cls_embeddings(tokens) ->
    (emb1, emb2)` each [B, D] L2-normalised fp32; `encode_text(tokens [B, L]) -> [B, D]`;
    `distill_logits(tokens) -> (cls [B, K], patches [B, N, K])` (fp32)."""

    image: dict[str, Any]
    text: dict[str, Any]
    embed_dim: int | None
    head: dict[str, Any]  # DinoHead's hidden, bottleneck, num_prototypes, num_layers
    logit_scale_init: float = 1 / 0.07
    logit_scale_max: float = 100.0
    dtype: jnp.dtype = jnp.float32

    def setup(self) -> None:
        self.image_tower = ViT(**dict(self.image, num_cls_tokens=NUM_CLS, pool="cls"), mask_token=True,
                               dtype=self.dtype, name="image")
        self.text_tower = TextTransformer(**self.text, dtype=self.dtype, name="text")
        proj = lambda name: layers.Linear(  # noqa: E731
            (self.embed_dim,), ("embed", "proj"), use_bias=False, kernel_init=nn.initializers.lecun_normal(),
            dtype=self.dtype, name=name)
        self.projections = [proj(f"image_proj_{i + 1}") for i in range(NUM_CLS)] if self.embed_dim else None
        self.text_proj = proj("text_proj") if self.embed_dim else None
        self.dino_head = DinoHead(**self.head, dtype=self.dtype, name="dino_head")
        self.scale = LogitScale(self.logit_scale_init, self.logit_scale_max, name="logit_scale")

    def image_tokens(self, images: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        return self.image_tower(images, mask=mask)[1]

    def cls_embeddings(self, tokens: jax.Array) -> tuple[jax.Array, ...]:
        out = []
        for i in range(NUM_CLS):
            x = tokens[:, i]
            out.append(l2_normalize(self.projections[i](x) if self.projections else x))
        return tuple(out)

    def encode_image(self, images: jax.Array, output: int = 1) -> jax.Array:
        """images -> the L2-normalised embedding of CLS token `output` (1 or 2): [B, D]."""
        return self.cls_embeddings(self.image_tokens(images))[output - 1]

    def patch_tokens(self, images: jax.Array) -> jax.Array:
        return self.image_tokens(images)[:, NUM_CLS:]

    def encode_text(self, tokens: jax.Array) -> jax.Array:
        pooled, _ = self.text_tower(tokens)
        return l2_normalize(self.text_proj(pooled) if self.text_proj is not None else pooled)

    def distill_logits(self, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
        return self.dino_head(tokens[:, 0]), self.dino_head(tokens[:, NUM_CLS:])

    def teacher_logits(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """What the EMA teacher computes (only `image` and `dino_head` params are read)."""
        return self.distill_logits(self.image_tokens(images))

    def logit_scale(self) -> jax.Array:
        return self.scale()

    def __call__(self, images: jax.Array, text: jax.Array, mask: jax.Array) -> dict[str, jax.Array]:
        tokens = self.image_tokens(images, mask)
        return {"cls": self.cls_embeddings(tokens), "text": self.encode_text(text),
                "distill": self.distill_logits(tokens), "logit_scale": self.logit_scale()}


class LogitScale(nn.Module):
    """t = min(exp(log t), max): CLIP's learnable temperature, a scalar."""

    init_value: float
    max_value: float

    @nn.compact
    def __call__(self) -> jax.Array:
        log_scale = self.param("log_logit_scale", nn.initializers.constant(math.log(self.init_value)), (), jnp.float32)
        return jnp.minimum(jnp.exp(log_scale), self.max_value)
