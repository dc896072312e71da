"""Masked-image-modelling losses (pure functions of arrays; means over the global batch, so under jit on a mesh
the compiler reduces over the batch axes and the result equals the single-device one).

Shapes: patches [B, N, P] with P = patch_size^2 * C (row-major patch pixels, channels last), masks [B, N]
(1 = masked), features [B, N, D].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def patchify(images: jax.Array, patch_size: int) -> jax.Array:
    """images [B, H, W, C] -> patches [B, (H/p)(W/p), p*p*C] in the ViT's row-major patch order."""
    b, h, w, c = images.shape
    p = patch_size
    x = images.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def simmim_l1(pred: jax.Array, target: jax.Array, mask: jax.Array) -> jax.Array:
    """SimMIM: mean |pred - target| over the channels of masked pixels only (no per-patch normalisation).

    pred, target [B, N, P]; mask [B, N]. Equals SimMIM's sum(|x̂-x| * m) / (sum(m_pixels) + 1e-5) / C.
    """
    m = mask.astype(jnp.float32)[..., None]
    err = jnp.abs(pred.astype(jnp.float32) - target.astype(jnp.float32)) * m
    return err.sum() / (m.sum() * pred.shape[-1] + 1e-5)


def normalize_patches(patches: jax.Array, eps: float = 1e-6) -> jax.Array:
    """MAE's norm_pix target: per patch (x - mean) / sqrt(unbiased var + eps). [B, N, P] -> [B, N, P]."""
    x = patches.astype(jnp.float32)
    mean = x.mean(-1, keepdims=True)
    var = x.var(-1, keepdims=True, ddof=1)
    return (x - mean) * jax.lax.rsqrt(var + eps)


def mae_mse(pred: jax.Array, patches: jax.Array, mask: jax.Array, norm_pix: bool = True) -> jax.Array:
    """MAE: (1/|M|) sum_{p in M} mean_d (pred_p - target_p)^2, target = normalised patches if `norm_pix`.

    pred, patches [B, N, P]; mask [B, N].
    """
    target = normalize_patches(patches) if norm_pix else patches.astype(jnp.float32)
    per_patch = jnp.mean((pred.astype(jnp.float32) - target) ** 2, axis=-1)
    m = mask.astype(jnp.float32)
    return (per_patch * m).sum() / jnp.maximum(m.sum(), 1.0)


def eva_cosine(pred: jax.Array, teacher: jax.Array, mask: jax.Array, eps: float = 1e-6) -> jax.Array:
    """EVA: -mean_{p in M} cos(pred_p, teacher_p); pred [B, N, D], teacher [B, N, D] (no gradient), mask [B, N]."""
    p = pred.astype(jnp.float32)
    t = jax.lax.stop_gradient(teacher.astype(jnp.float32))
    cos = (p * t).sum(-1) * jax.lax.rsqrt(jnp.maximum((p * p).sum(-1) * (t * t).sum(-1), eps * eps))
    m = mask.astype(jnp.float32)
    return -(cos * m).sum() / jnp.maximum(m.sum(), 1.0)
