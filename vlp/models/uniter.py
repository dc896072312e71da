"""UNITER (Chen et al., 2020): one single-stream transformer over text tokens and image regions.

vlp has no region detector, so image patches stand in for UNITER's Faster R-CNN regions: a region's feature is the
patch's pixels (p*p*3 values, UNITER's 2048-d detector feature) and its box is the patch's learned position
embedding (UNITER's 7-d box through FC+LN).

Inputs: text ids [B, L] (pad 0; the MLM task passes ids with [MASK]/random/kept tokens), region features
patches [B, N, P] and `region_mask` [B, N] (True = masked by MRFR: the feature is zeroed, as UNITER zeroes
masked region features; its position stays). Sequence: [CLS] + L text tokens + N regions, each modality
embedded as UNITER does (text: token + position, LN; image: FC(feature) + position, LN) plus a modality
embedding; a bidirectional pre-LN transformer (vlp's `layers.Encoder`, where BERT is post-LN) with the text
pads masked, then a final LN.

Heads: ITM (pooler tanh(W h_CLS) -> Linear(2)), MLM (Linear+GELU+LN -> vocab logits, tied to the token
embedding or its own), MRFR (Linear+GELU+LN -> P, tied to the transposed image-input kernel, as UNITER).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlp.models import layers


class Uniter(nn.Module):
    vocab_size: int
    max_len: int  # text tokens (without the CLS)
    num_regions: int
    region_dim: int  # P = patch_size^2 * 3
    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    pad_id: int = 0
    tied_mlm: bool = True
    tied_mrfr: bool = True
    activation: str = "gelu"
    ln_eps: float = 1e-12  # BERT's LayerNorm epsilon
    remat_policy: str = "none"
    scan_layers: bool = False
    attention: str = "auto"
    dtype: Any = jnp.float32

    def setup(self) -> None:
        normal = lambda std, names: layers.partitioned(nn.initializers.normal(std), names)  # noqa: E731
        self.token_embed = nn.Embed(self.vocab_size, self.width, dtype=self.dtype, param_dtype=jnp.float32,
                                    embedding_init=normal(0.02, ("vocab", "embed")), name="token_embed")
        self.cls_token = self.param("cls_token", normal(0.02, (None, "embed")), (1, self.width), jnp.float32)
        self.text_pos = self.param("text_pos", normal(0.02, ("length", "embed")), (self.max_len + 1, self.width),
                                   jnp.float32)
        self.region_kernel = self.param("region_kernel", layers.partitioned(layers.default_kernel_init,
                                                                            (None, "embed")),
                                        (self.region_dim, self.width), jnp.float32)
        self.region_bias = self.param("region_bias", layers.partitioned(nn.initializers.zeros, ("embed",)),
                                      (self.width,), jnp.float32)
        self.region_pos = self.param("region_pos", normal(0.02, ("length", "embed")), (self.num_regions, self.width),
                                     jnp.float32)
        self.type_embed = self.param("type_embed", normal(0.02, (None, "embed")), (2, self.width), jnp.float32)
        self.ln_text = layers.layer_norm(self.ln_eps, self.dtype, "ln_text")
        self.ln_region = layers.layer_norm(self.ln_eps, self.dtype, "ln_region")
        self.encoder = layers.Encoder(self.depth, self.num_heads, self.mlp_dim, self.activation, self.ln_eps,
                                      True, self.remat_policy, self.dtype, self.attention, scan=self.scan_layers,
                                      name="encoder")
        self.ln_final = layers.layer_norm(self.ln_eps, self.dtype, "ln_final")
        dense = lambda features, names, name: layers.Linear(  # noqa: E731
            (features,), names, dtype=self.dtype, name=name)
        self.itm_pooler = dense(self.width, ("embed", "mlp"), "itm_pooler")
        self.itm_head = dense(2, ("mlp", None), "itm_head")
        self.mlm_dense = dense(self.width, ("embed", "mlp"), "mlm_dense")
        self.mlm_ln = layers.layer_norm(self.ln_eps, self.dtype, "mlm_ln")
        self.mlm_bias = self.param("mlm_bias", layers.partitioned(nn.initializers.zeros, ("vocab",)),
                                   (self.vocab_size,), jnp.float32)
        if not self.tied_mlm:
            self.mlm_out = layers.Linear((self.vocab_size,), ("mlp", "vocab"), use_bias=False, dtype=self.dtype,
                                         name="mlm_out")
        self.mrfr_dense = dense(self.width, ("embed", "mlp"), "mrfr_dense")
        self.mrfr_ln = layers.layer_norm(self.ln_eps, self.dtype, "mrfr_ln")
        self.mrfr_bias = self.param("mrfr_bias", layers.partitioned(nn.initializers.zeros, (None,)),
                                    (self.region_dim,), jnp.float32)
        if not self.tied_mrfr:
            self.mrfr_out = layers.Linear((self.region_dim,), ("mlp", None), use_bias=False, dtype=self.dtype,
                                          name="mrfr_out")

    def __call__(self, text: jax.Array, patches: jax.Array,
                 region_mask: jax.Array | None = None) -> dict[str, jax.Array]:
        """text [B, L], patches [B, N, P], region_mask [B, N] -> cls [B, W], words [B, L, W], regions [B, N, W]
        (final-layer outputs) and itm_logits [B, 2] (fp32)."""
        batch, length = text.shape
        table = layers.constrain(self.token_embed.embedding.astype(self.dtype), (None, None))
        words = jnp.take(table, text, axis=0)
        cls = jnp.broadcast_to(self.cls_token.astype(self.dtype)[None], (batch, 1, self.width))
        words = jnp.concatenate([cls, words], axis=1) + self.text_pos[: length + 1].astype(self.dtype)[None]
        words = self.ln_text(words + self.type_embed[0].astype(self.dtype))
        feats = patches.astype(self.dtype)
        if region_mask is not None:
            feats = jnp.where(region_mask[..., None], 0.0, feats)
        regions = feats @ self.region_kernel.astype(self.dtype) + self.region_bias.astype(self.dtype)
        regions = self.ln_region(regions + self.region_pos.astype(self.dtype)[None]
                                 + self.type_embed[1].astype(self.dtype))
        x = layers.constrain(jnp.concatenate([words, regions], axis=1), ("batch", "length", "embed"))
        valid = jnp.concatenate([jnp.ones((batch, 1), bool), text != self.pad_id,
                                 jnp.ones((batch, patches.shape[1]), bool)], axis=1)
        x = self.ln_final(self.encoder(x, valid[:, None, None, :]))
        pooled = jnp.tanh(self.itm_pooler(x[:, 0]))
        return {"cls": x[:, 0], "words": x[:, 1: length + 1], "regions": x[:, length + 1:],
                "itm_logits": self.itm_head(pooled).astype(jnp.float32)}

    def mlm_logits(self, words: jax.Array) -> jax.Array:
        """Final-layer word outputs [B, L, W] (or [K, W]) -> vocab logits [..., V] (fp32)."""
        h = self.mlm_ln(layers.activation_fn(self.activation)(self.mlm_dense(words)))
        if self.tied_mlm:
            logits = h @ self.token_embed.embedding.astype(self.dtype).T
        else:
            logits = self.mlm_out(h)
        return (logits + self.mlm_bias.astype(self.dtype)).astype(jnp.float32)

    def mrfr_features(self, regions: jax.Array) -> jax.Array:
        """Final-layer region outputs [B, N, W] -> regressed region features [B, N, P] (fp32)."""
        h = self.mrfr_ln(layers.activation_fn(self.activation)(self.mrfr_dense(regions)))
        if self.tied_mrfr:
            out = h @ self.region_kernel.astype(self.dtype).T
        else:
            out = self.mrfr_out(h)
        return (out + self.mrfr_bias.astype(self.dtype)).astype(jnp.float32)

    def init_all(self, text: jax.Array, patches: jax.Array, region_mask: jax.Array) -> dict[str, jax.Array]:
        """Every head once (so `init` creates all params)."""
        out = self(text, patches, region_mask)
        return dict(out, mlm=self.mlm_logits(out["words"]), mrfr=self.mrfr_features(out["regions"]))
