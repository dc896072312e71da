"""Image captioner with an optional contrastive head: CoCa (Yu et al., 2022) and CapPa (Tschannen et al., 2023).

ViT tokens -> (CoCa) a 1-query attentional pooler -> projection -> L2-normalised image embedding;
           -> a `gen_queries`-query attentional pooler (or, with 0, the ViT tokens themselves, as CapPa) -> the image
              tokens the decoder's multimodal layers cross-attend to.
tokens -> `TextDecoder`: (CoCa) CLS output -> projection -> L2-normalised text embedding; logits [B, L, vocab].

`layout="open_clip"` (CoCa only) is open_clip's CoCa image side instead: ViT tokens without `ln_post` -> ONE
`gen_queries`-query pooler of width `embed_dim` (its LN is open_clip's `ln_post`); query 0 -> projection -> image
embedding, queries 1.. -> the decoder's image tokens (so the decoder width must equal `embed_dim`).
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlp.models import layers
from vlp.models.decoder import AttentionPooler, Cache, TextDecoder
from vlp.models.two_tower import l2_normalize
from vlp.models.vit import ViT


class Captioner(nn.Module):
    """`image` / `decoder`: keyword arguments of `ViT` / `TextDecoder`. `contrastive` (CoCa) adds the contrastive
    pooler, the projections and the learnable logit scale; the decoder then needs `embed_cls=True`."""

    image: dict[str, Any]
    decoder: dict[str, Any]
    contrastive: bool = True
    embed_dim: int = 128
    gen_queries: int = 256
    pooler_heads: int = 8
    layout: str = "vlp"  # decoder.LAYOUTS; also passed to the decoder
    logit_scale_init: float = 1 / 0.07
    logit_scale_max: float = 100.0
    dtype: Any = jnp.float32

    def setup(self) -> None:
        open_clip = self.layout == "open_clip"
        self.image_tower = ViT(**self.image, **({"ln_post": False} if open_clip else {}), dtype=self.dtype,
                               name="image")
        self.text_decoder = TextDecoder(**self.decoder, layout=self.layout, dtype=self.dtype, name="decoder")
        image_width = self.image["width"]
        if open_clip:
            if not (self.contrastive and self.gen_queries >= 2 and self.decoder["width"] == self.embed_dim):
                raise ValueError(
                    f"the open_clip layout is CoCa's (contrastive=True) with gen_queries >= 2 (query 0 is the "
                    f"contrastive one) and decoder width == embed_dim; got contrastive={self.contrastive}, "
                    f"gen_queries={self.gen_queries}, width={self.decoder['width']}, embed_dim={self.embed_dim}")
            self.gen_pooler = AttentionPooler(self.gen_queries, self.embed_dim, self.pooler_heads, dtype=self.dtype,
                                              name="gen_pooler")
        elif self.gen_queries:
            self.gen_pooler = AttentionPooler(self.gen_queries, image_width, self.pooler_heads, dtype=self.dtype,
                                              name="gen_pooler")
        if self.contrastive and not open_clip:
            self.con_pooler = AttentionPooler(1, image_width, self.pooler_heads, dtype=self.dtype, name="con_pooler")
        if self.contrastive:
            proj = lambda name: layers.Linear(  # noqa: E731
                (self.embed_dim,), ("embed", "proj"), use_bias=False, kernel_init=nn.initializers.lecun_normal(),
                dtype=self.dtype, name=name)
            self.image_proj, self.text_proj = proj("image_proj"), proj("text_proj")
            self.log_logit_scale = self.param(
                "log_logit_scale", nn.initializers.constant(math.log(self.logit_scale_init)), (), jnp.float32)

    def image_tokens(self, images: jax.Array) -> jax.Array:
        """images [B, H, W, 3] -> ViT tokens [B, N, width]."""
        return self.image_tower(images)[1]

    def image_context(self, tokens: jax.Array) -> jax.Array:
        """The image tokens the decoder reads [B, gen_queries (open_clip: - 1) or N, width]."""
        if self.layout == "open_clip":
            return self.gen_pooler(tokens)[:, 1:]
        return self.gen_pooler(tokens) if self.gen_queries else tokens

    def image_embedding(self, tokens: jax.Array) -> jax.Array:
        pooler = self.gen_pooler if self.layout == "open_clip" else self.con_pooler
        return l2_normalize(self.image_proj(pooler(tokens)[:, 0]))

    def encode_image(self, images: jax.Array) -> jax.Array:
        return self.image_embedding(self.image_tokens(images))

    def encode_text(self, tokens: jax.Array) -> jax.Array:
        cls, _ = self.text_decoder(tokens, None)
        return l2_normalize(self.text_proj(cls))

    def logit_scale(self) -> jax.Array:
        return jnp.minimum(jnp.exp(self.log_logit_scale), self.logit_scale_max)

    def __call__(self, images: jax.Array, tokens: jax.Array, masked: jax.Array | None = None) -> dict[str, jax.Array]:
        """logits [B, L, vocab] (fp32) and, with `contrastive`, image_emb, text_emb [B, D] and logit_scale."""
        image_tokens = self.image_tokens(images)
        cls, logits = self.text_decoder(tokens, self.image_context(image_tokens), masked)
        out = {"logits": logits}
        if self.contrastive:
            out.update(image_emb=self.image_embedding(image_tokens), text_emb=l2_normalize(self.text_proj(cls)),
                       logit_scale=self.logit_scale(), logit_bias=jnp.zeros((), jnp.float32))
        return out

    # Generation: `cross_kv` once per batch of images, then `decode_step` per position.
    def cross_kv(self, images: jax.Array) -> list[tuple[jax.Array, jax.Array]]:
        return self.text_decoder.cross_kv(self.image_context(self.image_tokens(images)))

    def decode_step(self, prev_token: jax.Array, index: jax.Array, cache: Cache,
                    cross_kv: list[tuple[jax.Array, jax.Array]]) -> tuple[jax.Array, Cache]:
        return self.text_decoder.decode_step(prev_token, index, cache, cross_kv)

    def image_context_of(self, images: jax.Array) -> jax.Array:
        return self.image_context(self.image_tokens(images))

    def decoder_logits(self, context: jax.Array, tokens: jax.Array) -> jax.Array:
        """Teacher-forced logits [B, L, vocab] from precomputed image context (uncached decoding reruns this)."""
        return self.text_decoder(tokens, context)[1]
