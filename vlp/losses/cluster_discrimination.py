"""MLCD's multi-label cluster-discrimination loss (An et al., 2024; methods.md section 16) with PartialFC-style
negative sampling, and its sharded form for a class-centre matrix split over the mesh.

Per image b with L2-normalised feature x_b and positive centres P_b (its k nearest k-means centres):

    L_b = log(1 + sum_{j in N_b} exp(s cos θ_bj)) + log(1 + sum_{i in P_b} exp(-s (cos θ_bi - m)))

θ is the angle to the L2-normalised learnable centre, N_b = the sampled centres that are not positives of b.
Negative sampling follows PartialFC (An et al., 2022): every step, each shard keeps the positives of the rows it
sees and fills up to `ceil(ratio * K_shard)` centres with random negatives; unsampled centres get no gradient.
The positive term reads each row's k positive centres directly (never sampled out).

The centre matrix [K, D] is sharded on `centre_axis` (fsdp): 1M x 512 fp32 is 2 GiB, plus Adam's two moments.
Inside `shard_map` each device gathers the embeddings of its data-parallel group over `centre_axis`, scores them
against its own centres only, and the two sums are combined across shards with a max-shifted psum.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

Metrics = dict[str, jax.Array]


def _normalize(x: jax.Array) -> jax.Array:
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def num_sampled(num_centres: int, ratio: float) -> int:
    """Centres each shard keeps per step: ceil(ratio * num_centres), at least 1 (ratio 1.0 = all)."""
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"sample ratio {ratio} must be in (0, 1]")
    return max(1, min(num_centres, math.ceil(ratio * num_centres)))


def _sample(scores: jax.Array, positives: jax.Array, offset: jax.Array, count: int) -> jax.Array:
    """Indices [count] of the local centres kept this step: every positive of `positives` [b, k] (global ids) that
    falls in [offset, offset + K_local), then the highest random `scores` [K_local] in [0, 1). If the shard holds
    more positives than `count`, some positives are dropped (PartialFC keeps them all, at a dynamic size)."""
    local = positives.reshape(-1) - offset
    # Ids of other shards go to index K_local, which mode="drop" drops (a negative index would wrap around).
    local = jnp.where((local >= 0) & (local < scores.shape[0]), local, scores.shape[0])
    boost = jnp.zeros_like(scores).at[local].set(2.0, mode="drop")
    if count == scores.shape[0]:
        return jnp.arange(count)
    return jax.lax.top_k(scores + boost, count)[1]


def _shard_sums(emb: jax.Array, centres: jax.Array, positives: jax.Array, scores: jax.Array, offset: jax.Array,
                count: int, scale: float, margin: float) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """This shard's parts of both sums for rows `emb` [b, D] against its centres [K_local, D].

    Returns (neg_logits [b, count], neg_mask [b, count], pos_logits [b, k], pos_mask [b, k]): the logits of the
    sampled non-positive centres, and of the row's positives held by this shard."""
    k_local = centres.shape[0]
    centres = _normalize(centres.astype(jnp.float32))
    kept = _sample(scores, positives, offset, count)  # [count]
    cos_neg = jnp.dot(emb, centres[kept].T)  # [b, count]
    is_pos = (positives[:, :, None] == (kept + offset)[None, None, :]).any(axis=1)  # [b, count]
    local = positives - offset  # [b, k]
    pos_mask = (local >= 0) & (local < k_local)
    cos_pos = jnp.einsum("bd,bkd->bk", emb, centres[jnp.clip(local, 0, k_local - 1)])
    return scale * cos_neg, ~is_pos, -scale * (cos_pos - margin), pos_mask


def _log1p_sum_exp(logits: jax.Array, mask: jax.Array, axes: tuple[str, ...]) -> jax.Array:
    """log(1 + sum over masked entries and over the shards of `axes` of exp(logits)), per row [b]; masked-out
    entries contribute exactly 0 (value and gradient)."""
    shift = jax.lax.stop_gradient(jnp.max(jnp.where(mask, logits, 0.0), axis=-1))
    shift = jnp.maximum(jax.lax.pmax(shift, axes) if axes else shift, 0.0)  # >= 0: the "1 +" term
    part = jnp.sum(jnp.where(mask, jnp.exp(jnp.where(mask, logits, 0.0) - shift[:, None]), 0.0), axis=-1)
    total = jax.lax.psum(part, axes) if axes else part
    return shift + jnp.log(jnp.exp(-shift) + total)


def mlcd_loss(emb: jax.Array, centres: jax.Array, positives: jax.Array, rng: jax.Array | None = None, *,
              scale: float = 64.0, margin: float = 0.0, sample_ratio: float = 1.0) -> tuple[jax.Array, Metrics]:
    """The loss on one device (the reference the sharded form is tested against).

    Args:
      emb: [B, D] image features (normalised here, in fp32).
      centres: [K, D] class centres (normalised here).
      positives: [B, k] int32 centre ids (each row's k nearest centres; distinct within a row).
      rng: draws the sampled negatives (unused at sample_ratio 1.0).
      scale: s; margin: m, subtracted from the positives' cosine.
      sample_ratio: share of the centres kept per step (PartialFC).
    Returns:
      (mean over B of L_b, metrics with its two terms).
    """
    count = num_sampled(centres.shape[0], sample_ratio)
    scores = jnp.zeros(centres.shape[0]) if count == centres.shape[0] else jax.random.uniform(rng, centres.shape[:1])
    emb = _normalize(emb.astype(jnp.float32))
    neg, neg_mask, pos, pos_mask = _shard_sums(emb, centres, positives, scores, jnp.int32(0), count, scale, margin)
    loss_neg, loss_pos = _log1p_sum_exp(neg, neg_mask, ()), _log1p_sum_exp(pos, pos_mask, ())
    return jnp.mean(loss_neg + loss_pos), {"loss_negative": jnp.mean(loss_neg), "loss_positive": jnp.mean(loss_pos)}


def sharded_mlcd_loss(emb: jax.Array, centres: jax.Array, positives: jax.Array, rng: jax.Array | None = None, *,
                      scale: float = 64.0, margin: float = 0.0, sample_ratio: float = 1.0, mesh: Mesh | None = None,
                      batch_axes: Sequence[str] = ("data", "fsdp"), centre_axis: str = "fsdp"
                      ) -> tuple[jax.Array, Metrics]:
    """`mlcd_loss` with `emb` [B, D] and `positives` [B, k] sharded on `batch_axes` and `centres` [K, D] on
    `centre_axis` (K divisible by its size; replicated over the other axes). Each shard samples
    `ceil(sample_ratio * K / shards)` of its centres from its slice of one global uniform draw, so at ratio 1.0
    it equals `mlcd_loss` exactly for any mesh. `mesh`: None takes the mesh set with `jax.set_mesh`."""
    batch_axes = tuple(batch_axes)
    if centre_axis not in batch_axes:
        raise ValueError(f"centre_axis {centre_axis!r} must be one of the batch axes {batch_axes}: each shard "
                         f"gathers the rows of its group over it")
    mesh = mesh or jax.sharding.get_abstract_mesh()
    shards = mesh.shape[centre_axis]
    num_centres = centres.shape[0]
    if num_centres % shards:
        raise ValueError(f"{num_centres} centres do not split over the {shards} devices of mesh axis "
                         f"{centre_axis!r}; use a multiple of {shards}")
    k_local = num_centres // shards
    count = num_sampled(k_local, sample_ratio)
    scores = jnp.zeros((num_centres,)) if count == k_local else jax.random.uniform(rng, (num_centres,))
    groups = tuple(a for a in batch_axes if a != centre_axis)  # the data-parallel copies of the centres

    def per_device(emb, centres, positives, scores):
        emb = jax.lax.all_gather(_normalize(emb.astype(jnp.float32)), centre_axis, tiled=True)
        positives = jax.lax.all_gather(positives, centre_axis, tiled=True)
        offset = jax.lax.axis_index(centre_axis) * k_local
        neg, neg_mask, pos, pos_mask = _shard_sums(emb, centres, positives, scores, offset, count, scale, margin)
        loss_neg = _log1p_sum_exp(neg, neg_mask, (centre_axis,))
        loss_pos = _log1p_sum_exp(pos, pos_mask, (centre_axis,))
        # Every shard of a group now holds the same per-row values; sum the groups' rows.
        sums = [jnp.sum(x) for x in (loss_neg + loss_pos, loss_neg, loss_pos)]
        rows = emb.shape[0] * math.prod(jax.lax.axis_size(a) for a in groups)
        total, neg_sum, pos_sum = [(jax.lax.psum(x, groups) if groups else x) / rows for x in sums]
        return total, {"loss_negative": neg_sum, "loss_positive": pos_sum}

    return jax.shard_map(
        per_device, mesh=mesh,
        in_specs=(P(batch_axes), P(centre_axis), P(batch_axes), P(centre_axis)),
        out_specs=(P(), P()),
    )(emb, centres, positives.astype(jnp.int32), scores)
