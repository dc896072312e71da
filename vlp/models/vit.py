"""Vision Transformer image tower (linen), sizes by name: `Ti/16`, `S/16`, `B/16`, `L/14`, `So400m/14`, `g/14`."""

from __future__ import annotations

import dataclasses
import re

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlp.models import layers

# width, depth, mlp_dim, heads (So400m: the shape-optimised ViT of SigLIP; g: ViT-g/14 of OpenCLIP).
VIT_SIZES: dict[str, tuple[int, int, int, int]] = {
    "Ti": (192, 12, 768, 3),
    "S": (384, 12, 1536, 6),
    "M": (512, 12, 2048, 8),
    "B": (768, 12, 3072, 12),
    "L": (1024, 24, 4096, 16),
    "So400m": (1152, 27, 4304, 16),
    "H": (1280, 32, 5120, 16),
    "g": (1408, 40, 6144, 16),
}


@dataclasses.dataclass(frozen=True)
class VitShape:
    width: int
    depth: int
    mlp_dim: int
    num_heads: int
    patch_size: int


def vit_shape(variant: str) -> VitShape:
    """`"B/16"` -> VitShape(768, 12, 3072, 12, 16)."""
    match = re.fullmatch(r"(\w+?)/(\d+)", variant)
    if not match or match.group(1) not in VIT_SIZES:
        raise ValueError(f"unknown ViT variant {variant!r}; valid: '<size>/<patch>' with size in {list(VIT_SIZES)}")
    return VitShape(*VIT_SIZES[match.group(1)], int(match.group(2)))


def num_kept_patches(num_patches: int, patch_dropout: float) -> int:
    """FLIP patch dropout keeps round((1 - p) * N) of N patch tokens (at least one)."""
    if not 0 <= patch_dropout < 1:
        raise ValueError(f"patch dropout {patch_dropout} must be in [0, 1)")
    return max(1, round((1.0 - patch_dropout) * num_patches))


def patch_dropout_keep(rng: jax.Array, batch_size: int, num_patches: int, num_keep: int) -> jax.Array:
    """FLIP patch dropout: the indices [B, num_keep] (ascending, distinct) of the patch tokens each example keeps.

    Example i draws from `fold_in(rng, i)`: `i` is its row in the global batch, so the draw depends neither on how
    the batch is sharded nor on micro-batching, and a step's `rng` (a function of seed and step) fixes it. The
    indices feed `ViT(keep=...)`, which gathers them after the position embedding (CLS tokens are always kept).
    """
    keys = jax.vmap(lambda i: jax.random.fold_in(rng, i))(jnp.arange(batch_size))
    scores = jax.vmap(lambda key: jax.random.uniform(key, (num_patches,)))(keys)
    _, keep = jax.lax.top_k(scores, num_keep)  # distinct indices of the num_keep largest scores
    return jnp.sort(keep, axis=1).astype(jnp.int32)


POOLINGS = ("cls", "gap", "map")
POSEMBS = ("learn", "sincos2d")


class ViT(nn.Module):
    """ViT: patchify -> (+ CLS tokens) -> + position embedding -> [ln_pre] -> pre-LN blocks -> ln_post -> pool.

    images [B, H, W, C] float -> (pooled [B, width], tokens [B, num_cls + N, width]).
    Masked-image modelling: `mask` [B, N] bool (True = masked) replaces those patch embeddings with a learned
    mask token (SimMIM, iBOT, EVA; needs `mask_token=True`); `keep` [B, N_vis] int keeps only those patches
    (after the position embedding: MAE's encoder on visible tokens, FLIP's patch dropout, see
    `patch_dropout_keep`), so tokens are [B, num_cls + N_vis, width].
    `pool`: `cls` (first CLS token, CLIP), `gap` (mean of patch tokens), `map` (attention pooling, SigLIP).
    `ln_pre` is CLIP's LayerNorm before the blocks (Hugging Face `pre_layrnorm`).
    """

    width: int
    depth: int
    mlp_dim: int
    num_heads: int
    patch_size: int
    pool: str = "cls"
    posemb: str = "learn"
    num_cls_tokens: int = 1
    ln_pre: bool = True
    ln_post: bool = True  # False: tokens leave the blocks un-normed (open_clip's CoCa pools them first)
    patch_bias: bool = False
    activation: str = "gelu"
    ln_eps: float = 1e-5
    fused_qkv: bool = True
    remat_policy: str = "none"  # layers.REMAT_POLICIES
    scan_layers: bool = False  # blocks under nn.scan (params encoder/blocks/..., a leading [depth] axis)
    attention: str = "auto"  # layers.ATTENTION_IMPLEMENTATIONS
    mask_token: bool = False
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array, mask: jax.Array | None = None,
                 keep: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        if self.pool not in POOLINGS:
            raise ValueError(f"unknown ViT pooling {self.pool!r}; valid: {POOLINGS}")
        if self.posemb not in POSEMBS:
            raise ValueError(f"unknown ViT position embedding {self.posemb!r}; valid: {POSEMBS}")
        batch, height, width_px, _ = images.shape
        if height % self.patch_size or width_px % self.patch_size:
            raise ValueError(f"image size {height}x{width_px} is not divisible by patch size {self.patch_size}")
        x = nn.Conv(
            self.width, (self.patch_size, self.patch_size), strides=self.patch_size, padding="VALID",
            use_bias=self.patch_bias, dtype=self.dtype, param_dtype=jnp.float32,
            kernel_init=layers.partitioned(nn.initializers.lecun_normal(), ("patch_h", "patch_w", "channels", "embed")),
            bias_init=layers.partitioned(nn.initializers.zeros, ("embed",)), name="patch_embed",
        )(images.astype(self.dtype))
        grid_h, grid_w = x.shape[1], x.shape[2]
        x = x.reshape(batch, grid_h * grid_w, self.width)
        num_cls = self.num_cls_tokens if self.pool == "cls" else 0
        if num_cls:  # params are created in the same order as before mask tokens existed (same init values)
            cls = self.param("cls_token", layers.partitioned(nn.initializers.normal(0.02), (None, None, "embed")),
                             (1, num_cls, self.width), jnp.float32)
        if self.posemb == "learn":
            pos = self.param("pos_embed", layers.partitioned(nn.initializers.normal(0.02), ("length", "embed")),
                             (num_cls + grid_h * grid_w, self.width), jnp.float32)
        else:
            pos = jnp.asarray(layers.sincos_2d(grid_h, grid_w, self.width))
            pos = jnp.concatenate([jnp.zeros((num_cls, self.width)), pos], axis=0)
        pos = pos.astype(self.dtype)
        if self.mask_token:  # created whenever configured, so the params do not depend on the call
            token = self.param("mask_token", layers.partitioned(nn.initializers.normal(0.02), (None, None, "embed")),
                               (1, 1, self.width), jnp.float32)
        if mask is not None:
            if not self.mask_token:
                raise ValueError("ViT called with a mask but built with mask_token=False")
            x = jnp.where(mask[..., None], token.astype(self.dtype), x)
        x = x + pos[num_cls:][None]
        if keep is not None:
            keep = layers.constrain(keep, ("batch", None))  # gathered where the rows live
            x = jnp.take_along_axis(x, keep[..., None], axis=1)
        if num_cls:
            cls = cls.astype(self.dtype) + pos[None, :num_cls]
            x = jnp.concatenate([jnp.broadcast_to(cls, (batch, num_cls, self.width)), x], axis=1)
        if self.ln_pre:
            x = layers.layer_norm(self.ln_eps, self.dtype, "ln_pre")(x)
        x = layers.Encoder(self.depth, self.num_heads, self.mlp_dim, self.activation, self.ln_eps, self.fused_qkv,
                           self.remat_policy, self.dtype, self.attention, scan=self.scan_layers,
                           name="encoder")(x)
        if self.ln_post:
            x = layers.layer_norm(self.ln_eps, self.dtype, "ln_post")(x)
        if self.pool == "cls":
            pooled = x[:, 0]
        elif self.pool == "gap":
            pooled = x.mean(axis=1)
        else:
            pooled = layers.MapHead(self.num_heads, self.mlp_dim, self.activation, self.ln_eps, self.dtype,
                                    name="map_head")(x)
        return pooled, x
