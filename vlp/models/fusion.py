"""ALBEF-style image-text model (linen): a ViT, a bidirectional text encoder, and a fusion encoder whose text layers
cross-attend to the image tokens; projections to the contrastive space, an ITM head and an MLM head.

Text layout: vlp's tokenizers have no [CLS], so the model prepends a learned one as token id `cls_id` (one past
the MLM mask id): a caption [B, L] becomes [B, L + 1], position 0 is the CLS whose output is the unimodal text
feature (after the first `text.depth` layers) and the ITM feature (after the fusion layers). ALBEF's BERT-base
split is text depth 6 + fusion depth 6 (`fusion_layer=6`).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlp.models import layers
from vlp.models.decoder import DecoderBlock
from vlp.models.text import TextTransformer
from vlp.models.two_tower import l2_normalize
from vlp.models.vit import ViT


class FusionEncoder(nn.Module):
    """Pre-LN blocks of bidirectional self-attention (padding masked), cross-attention to image tokens and an MLP,
    then LN: text x [B, T, D], keep [B, T] bool (False = padding), image tokens [B, N, C] -> [B, T, D]."""

    depth: int
    width: int
    num_heads: int
    mlp_dim: int
    activation: str = "gelu"
    ln_eps: float = 1e-5
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, keep: jax.Array, image_tokens: jax.Array) -> jax.Array:
        mask = keep[:, None, None, :]
        for i in range(self.depth):
            block = DecoderBlock(self.width, self.num_heads, self.mlp_dim, cross=True, activation=self.activation,
                                 ln_eps=self.ln_eps, dtype=self.dtype, name=f"block_{i}")
            x, _ = block(x, mask, block.cross_kv(image_tokens))
        return layers.layer_norm(self.ln_eps, self.dtype, "ln_final")(x)


class MlmHead(nn.Module):
    """BERT's prediction head: dense + activation + LN, then a vocab projection (the token embedding table
    `tied` [V, D] transposed, or its own kernel) + bias. x [..., D] -> logits [..., V] (float32)."""

    vocab_size: int
    activation: str = "gelu"
    ln_eps: float = 1e-5
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, tied: jax.Array | None = None) -> jax.Array:
        width = x.shape[-1]
        x = layers.Linear((width,), ("embed", "mlp"), dtype=self.dtype, name="transform")(x)
        x = layers.layer_norm(self.ln_eps, self.dtype, "ln")(layers.activation_fn(self.activation)(x))
        if tied is None:
            logits = layers.Linear((self.vocab_size,), ("embed", "vocab"), use_bias=False, dtype=self.dtype,
                                   kernel_init=nn.initializers.normal(0.02), name="decoder")(x)
        else:
            logits = jnp.einsum("...d,vd->...v", x, tied.astype(self.dtype))
        bias = self.param("bias", layers.partitioned(nn.initializers.zeros, ("vocab",)), (self.vocab_size,),
                          jnp.float32)
        return logits.astype(jnp.float32) + bias


class FusionModel(nn.Module):
    """ViT + text encoder + fusion encoder + heads. `image` / `text` are ViT / TextTransformer kwargs (the text
    kwargs without `max_len` and `vocab_size`, which come from `max_text_len` and `vocab_size`)."""

    image: dict
    text: dict
    fusion_depth: int
    embed_dim: int
    vocab_size: int  # tokenizer ids + the MLM mask id (vlp.data.mlm.mlm_vocab_size)
    max_text_len: int
    temp_init: float = 0.07
    temp_min: float = 0.001
    temp_max: float = 0.5
    tie_mlm_head: bool = True
    dtype: Any = jnp.float32

    @property
    def cls_id(self) -> int:
        return self.vocab_size  # one past the mask id

    def setup(self) -> None:
        self.image_tower = ViT(**self.image, dtype=self.dtype)
        text = dict(self.text, causal=False, padding_mask=True, pool="mean")
        self.text_tower = TextTransformer(vocab_size=self.vocab_size + 1, max_len=self.max_text_len + 1, **text,
                                          dtype=self.dtype)
        t = self.text
        self.fusion = FusionEncoder(self.fusion_depth, t["width"], t["num_heads"], t["mlp_dim"],
                                    t.get("activation", "gelu"), t.get("ln_eps", 1e-5), self.dtype)
        proj = lambda name: layers.Linear((self.embed_dim,), ("embed", "mlp"), dtype=self.dtype, name=name)  # noqa
        self.image_proj, self.text_proj = proj("image_proj"), proj("text_proj")
        self.itm_head = layers.Linear((2,), ("embed", None), dtype=self.dtype, name="itm_head")
        self.mlm_head = MlmHead(self.vocab_size + 1, t.get("activation", "gelu"), t.get("ln_eps", 1e-5),
                                self.dtype)
        self.temp_param = self.param("temp", nn.initializers.constant(self.temp_init), (), jnp.float32)

    def temp(self) -> jax.Array:
        """The contrastive temperature, clamped to [temp_min, temp_max] (ALBEF clamps its parameter each step)."""
        return jnp.clip(self.temp_param, self.temp_min, self.temp_max)

    def encode_image(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """images [B, H, W, 3] -> (L2-normalised image feature [B, E], image tokens [B, 1 + N, W_img])."""
        pooled, tokens = self.image_tower(images)
        return l2_normalize(self.image_proj(pooled)), tokens

    def encode_text(self, tokens: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """tokens [B, L] -> (L2-normalised text feature [B, E], text states [B, 1 + L, D], keep [B, 1 + L])."""
        with_cls = jnp.concatenate([jnp.full((tokens.shape[0], 1), self.cls_id, tokens.dtype), tokens], axis=1)
        _, x = self.text_tower(with_cls)
        keep = with_cls != self.text["pad_id"]
        return l2_normalize(self.text_proj(x[:, 0])), x, keep

    def fuse(self, text_x: jax.Array, keep: jax.Array, image_tokens: jax.Array) -> jax.Array:
        """text states [B, T, D], keep [B, T], image tokens [B, N, C] -> fused states [B, T, D]."""
        return self.fusion(text_x, keep, image_tokens)

    def itm_logits(self, fused: jax.Array) -> jax.Array:
        """fused [B, T, D] -> matched / not matched logits [B, 2] (class 1 = matched) from the CLS position."""
        return self.itm_head(fused[:, 0]).astype(jnp.float32)

    def mlm_logits(self, fused: jax.Array) -> jax.Array:
        """fused [B, 1 + L, D] -> token logits [B, L, V + 1] at the caption positions (CLS dropped)."""
        tied = None
        if self.tie_mlm_head:
            tied = self.text_tower.variables["params"]["token_embed"]["embedding"]
            tied = nn.unbox(tied)
        return self.mlm_head(fused[:, 1:], tied)

    def image_locals(self, image_tokens: jax.Array) -> jax.Array:
        """Patch tokens (CLS dropped) in the contrastive space, L2-normalised: [B, 1 + N, W] -> [B, N, E]."""
        return l2_normalize(self.image_proj(image_tokens[:, 1:]))

    def text_locals(self, text_x: jax.Array) -> jax.Array:
        """Caption token states in the contrastive space, L2-normalised: [B, 1 + L, D] -> [B, L, E]."""
        return l2_normalize(self.text_proj(text_x[:, 1:]))

    def __call__(self, images: jax.Array, tokens: jax.Array) -> dict[str, jax.Array]:
        image_feat, image_tokens = self.encode_image(images)
        text_feat, text_x, keep = self.encode_text(tokens)
        fused = self.fuse(text_x, keep, image_tokens)
        return {"image_feat": image_feat, "text_feat": text_feat, "itm_logits": self.itm_logits(fused),
                "mlm_logits": self.mlm_logits(fused), "image_locals": self.image_locals(image_tokens),
                "text_locals": self.text_locals(text_x), "temp": self.temp()}
