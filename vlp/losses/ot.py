"""Optimal transport between word and image-token features: UNITER's word-region alignment (WRA).

IPOT (Xie et al., 2019, "A Fast Proximal Point Method for Computing Exact Wasserstein Distance"), as UNITER's
`uniter/model/ot.py`: the plan T* of min_T <C, T> over the couplings of uniform marginals on the valid tokens, by
proximal-point steps T <- argmin <C, T> + beta KL(T || T_prev), each one Sinkhorn scaling (k = 1) of the kernel
A * T_prev with A = exp(-C / beta). Written here rather than taken from ott-jax: ott-jax solves entropic OT with a
fixed epsilon (Sinkhorn), and IPOT's re-weighted kernel with one scaling per outer step is not one of its solvers;
emulating it would take 50 one-iteration ott solves for a 10-line loop.

Shapes: words [B, M, D], regions [B, N, D], masks [B, M] / [B, N] (True = a valid, non-pad token).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def cosine_cost(words: jax.Array, regions: jax.Array, eps: float = 1e-5) -> jax.Array:
    """C = 1 - cos(w_i, v_j): [B, M, D], [B, N, D] -> [B, M, N] in float32 (UNITER's `cost_matrix_cosine`)."""
    w = words.astype(jnp.float32)
    v = regions.astype(jnp.float32)
    w = w / (jnp.linalg.norm(w, axis=-1, keepdims=True) + eps)
    v = v / (jnp.linalg.norm(v, axis=-1, keepdims=True) + eps)
    return 1.0 - jnp.einsum("bmd,bnd->bmn", w, v)


def ipot_plan(cost: jax.Array, word_mask: jax.Array, region_mask: jax.Array, beta: float = 0.5,
              iterations: int = 50) -> jax.Array:
    """The IPOT transport plan T [B, M, N] for cost [B, M, N] (no gradient: the plan is a constant of the loss).

    Rows (words) of T sum to 1/n_words exactly after the last scaling, columns (regions) to ~1/n_regions (IPOT's
    k = 1 converges to the exact plan); pad rows and columns are zero.
    """
    cost = jax.lax.stop_gradient(cost.astype(jnp.float32))
    wm, rm = word_mask.astype(jnp.float32), region_mask.astype(jnp.float32)
    joint = wm[:, :, None] * rm[:, None, :]
    n_words = jnp.maximum(wm.sum(-1), 1.0)[:, None]  # [B, 1]
    n_regions = jnp.maximum(rm.sum(-1), 1.0)[:, None]
    kernel = jnp.exp(-cost / beta) * joint
    # 1 / (n x + pad_big) is 0 on pads (UNITER adds 1e4 there); `where` keeps pads exactly zero instead.
    safe_inv = lambda x, mask: jnp.where(mask > 0, 1.0 / jnp.where(mask > 0, x, 1.0), 0.0)  # noqa: E731

    def step(_, carry):  # UNITER's order: scale the regions, then the words (so word marginals are exact)
        plan, sigma = carry
        q = kernel * plan
        delta = safe_inv(n_regions * jnp.einsum("bmn,bm->bn", q, sigma), rm)  # region scaling [B, N]
        sigma = safe_inv(n_words * jnp.einsum("bmn,bn->bm", q, delta), wm)  # word scaling [B, M]
        return sigma[:, :, None] * q * delta[:, None, :], sigma

    plan, _ = jax.lax.fori_loop(0, iterations, step, (joint, wm / n_words))
    return jax.lax.stop_gradient(plan * joint)


def ot_distance(words: jax.Array, regions: jax.Array, word_mask: jax.Array, region_mask: jax.Array,
                beta: float = 0.5, iterations: int = 50) -> jax.Array:
    """D(w, v) = tr(C^T T*) per example [B]; the gradient flows through the cost C only (UNITER)."""
    cost = cosine_cost(words, regions)
    joint = word_mask[:, :, None] & region_mask[:, None, :]
    cost = jnp.where(joint, cost, 0.0)
    plan = ipot_plan(cost, word_mask, region_mask, beta, iterations)
    return (cost * plan).sum(axis=(1, 2))


def wra_loss(distance: jax.Array, is_positive: jax.Array) -> jax.Array:
    """UNITER's WRA loss (sum_pos D - sum_neg D) / (n_pos + n_neg): distance [B], is_positive [B] bool -> scalar.

    Over the global batch (under jit on a mesh the sums reduce over the batch axes)."""
    sign = jnp.where(is_positive, 1.0, -1.0)
    return (sign * distance.astype(jnp.float32)).sum() / distance.shape[0]
