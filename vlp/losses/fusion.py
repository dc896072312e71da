"""Losses of the fusion-encoder objectives (ALBEF, TCL, UNITER): masked language modelling, image-text matching with
hard negatives, and image-text contrast against momentum features and feature queues with momentum distillation.

All functions take global arrays (batch rows sharded on the mesh's batch axes; the compiler gathers what a row needs,
as the "gather" contrastive variant does) and are pure, so one device and any mesh give the same numbers.

Groups: ALBEF contrasts and samples hard negatives within each GPU's local batch. Here that is `groups` = the number
of batch shards: row i may pair with the batch columns of its own group (`i // (B / groups)`) only. `groups=1` uses
the global batch, which does not depend on the mesh.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from vlp.data.mlm import IGNORE_LABEL

_NEG = -1e30  # logit of a column a row may not pair with (finite, so 0 * it stays 0)


def same_group(rows: int, cols: int, groups: int) -> jax.Array:
    """bool [rows, cols]: row i and column j lie in the same of `groups` equal contiguous blocks."""
    if groups < 1 or rows % groups or cols % groups:
        raise ValueError(f"{groups} groups do not split a {rows} x {cols} batch into equal blocks; use a divisor "
                         f"of both")
    row_group = jnp.arange(rows) // (rows // groups)
    col_group = jnp.arange(cols) // (cols // groups)
    return row_group[:, None] == col_group[None, :]


def _log_softmax_ce(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """-sum_j targets_j log softmax(logits)_j over the last axis (targets are probabilities, 0 where masked)."""
    return -jnp.sum(jnp.where(targets > 0, targets * jax.nn.log_softmax(logits, axis=-1), 0.0), axis=-1)


def mlm_loss(logits: jax.Array, labels: jax.Array, teacher_logits: jax.Array | None = None,
             alpha: jax.Array | float = 0.0) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Masked-token loss: logits [B, L, V], labels [B, L] (`IGNORE_LABEL` where not predicted) -> scalar.

    Mean over the predicted tokens of the whole batch of (1 - alpha) CE(label) + alpha H(softmax(teacher), p)
    (ALBEF's momentum distillation; `teacher_logits` [B, L, V] get no gradient). 0 when no token is predicted.
    """
    logits = logits.astype(jnp.float32)
    valid = labels != IGNORE_LABEL
    onehot = jax.nn.one_hot(jnp.where(valid, labels, 0), logits.shape[-1], dtype=jnp.float32)
    targets = onehot
    if teacher_logits is not None:
        soft = jax.nn.softmax(jax.lax.stop_gradient(teacher_logits.astype(jnp.float32)), axis=-1)
        targets = (1.0 - alpha) * onehot + alpha * soft
    per_token = _log_softmax_ce(logits, targets)
    count = valid.sum()
    loss = jnp.where(valid, per_token, 0.0).sum() / jnp.maximum(count, 1)
    correct = (jnp.argmax(logits, -1) == labels) & valid
    return loss, {"mlm_accuracy": correct.sum() / jnp.maximum(count, 1), "mlm_tokens": count.astype(jnp.float32)}


def itm_loss(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Image-text matching: logits [N, 2] (class 1 = matched), labels [N] in {0, 1} -> mean CE, accuracy."""
    logits = logits.astype(jnp.float32)
    loss = -jnp.take_along_axis(jax.nn.log_softmax(logits, -1), labels[:, None], axis=-1).mean()
    return loss, {"itm_accuracy": (jnp.argmax(logits, -1) == labels).mean()}


def sample_hard_negatives(sim: jax.Array, key: jax.Array, groups: int = 1) -> jax.Array:
    """For each row i of sim [B, B] (query i vs candidate j; i's positive is j = i), one candidate j != i of i's
    group drawn with probability softmax(sim[i]) renormalised without the diagonal -> int32 [B].

    Gumbel-max over the global [B, B] noise of `key` (jax's partitionable threefry draws the same bits for any
    sharding), so a seed gives the same negatives on one device and on any mesh.
    """
    rows, cols = sim.shape
    allowed = same_group(rows, cols, groups) & ~jnp.eye(rows, cols, dtype=bool)
    if cols // groups < 2:
        raise ValueError(f"hard negatives need >= 2 candidates per group; got {cols} candidates in {groups} groups")
    noise = jax.random.gumbel(key, sim.shape, jnp.float32)
    scores = jnp.where(allowed, jax.lax.stop_gradient(sim).astype(jnp.float32) + noise, -jnp.inf)
    return jnp.argmax(scores, axis=-1).astype(jnp.int32)


def distillation_targets(onehot: jax.Array, momentum_logits: jax.Array, alpha: jax.Array | float) -> jax.Array:
    """Momentum distillation: (1 - alpha) onehot + alpha softmax(momentum_logits) (no gradient) [..., C]."""
    soft = jax.nn.softmax(jax.lax.stop_gradient(momentum_logits.astype(jnp.float32)), axis=-1)
    return (1.0 - alpha) * onehot + alpha * soft


def _queue_logits(query: jax.Array, keys: jax.Array, queue: jax.Array, temp: jax.Array, groups: int) -> jax.Array:
    """query [B, D] vs [keys [B, D] ; queue [Q, D]] / temp -> [B, B + Q], other groups' keys masked."""
    logits = jnp.einsum("bd,cd->bc", query, jnp.concatenate([keys, queue], axis=0)) / temp
    batch = keys.shape[0]
    allowed = jnp.concatenate([same_group(query.shape[0], batch, groups),
                               jnp.ones((query.shape[0], queue.shape[0]), bool)], axis=1)
    return jnp.where(allowed, logits.astype(jnp.float32), _NEG)


def queue_contrastive_loss(query: jax.Array, keys: jax.Array, queue: jax.Array, temp: jax.Array,
                           query_m: jax.Array | None = None, alpha: jax.Array | float = 0.0,
                           groups: int = 1) -> tuple[jax.Array, jax.Array]:
    """One direction of ALBEF's ITC: L2-normalised query [B, D] (online) against the momentum keys [B, D] of its
    group and the queue [Q, D]; the positive of row i is key i. With `query_m` (the momentum query [B, D]) the
    targets are distilled: (1 - alpha) onehot + alpha softmax(query_m . [keys; queue] / temp).

    -> (mean loss, accuracy). At random init the loss is ~ ln(B / groups + Q).
    """
    logits = _queue_logits(query, keys, queue, temp, groups)
    onehot = jnp.eye(*logits.shape, dtype=jnp.float32)
    targets = onehot
    if query_m is not None:
        targets = distillation_targets(onehot, _queue_logits(query_m, keys, queue, temp, groups), alpha)
    loss = _log_softmax_ce(logits, targets).mean()
    accuracy = (jnp.argmax(logits, -1) == jnp.arange(logits.shape[0])).mean()
    return loss, accuracy


def enqueue(queue: jax.Array, ptr: jax.Array, features: jax.Array) -> tuple[jax.Array, jax.Array]:
    """FIFO queue [Q, D] with write position `ptr` (int32 []): writes features [B, D] at ptr (Q % B == 0, so a batch
    never wraps) -> (queue, (ptr + B) % Q)."""
    size, batch = queue.shape[0], features.shape[0]
    if size % batch:
        raise ValueError(f"queue size {size} is not divisible by the global batch {batch}")
    queue = jax.lax.dynamic_update_slice(queue, jax.lax.stop_gradient(features).astype(queue.dtype),
                                         (ptr, jnp.zeros_like(ptr)))
    return queue, ((ptr + batch) % size).astype(jnp.int32)


def local_mutual_information_loss(global_emb: jax.Array, local_emb: jax.Array, valid: jax.Array,
                                  temp: jax.Array, groups: int = 1) -> jax.Array:
    """TCL's local MI term (InfoNCE of a global embedding against locals): global_emb [B, E], local_emb [B, K, E],
    valid [B, K] (False: padding, which neither counts as a positive nor as a negative).

    For each valid local k of row i: -log e^{g_i.l_ik/t} / (e^{g_i.l_ik/t} + sum_{j != i in i's group, k' valid}
    e^{g_i.l_jk'/t}); the mean over the valid locals of the batch. At random init ~ ln(1 + (B/groups - 1) K).
    """
    batch, k = local_emb.shape[:2]
    scores = jnp.einsum("be,cke->bck", global_emb.astype(jnp.float32), local_emb.astype(jnp.float32)) / temp
    positive = jnp.einsum("bbk->bk", scores)  # g_i . l_ik
    others = same_group(batch, batch, groups) & ~jnp.eye(batch, dtype=bool)
    negatives = others[:, :, None] & valid[None, :, :]  # [B, B, K]: row i, local (j, k')
    neg_lse = jax.nn.logsumexp(jnp.where(negatives, scores, -jnp.inf).reshape(batch, -1), axis=-1)
    per_local = jnp.logaddexp(positive, neg_lse[:, None]) - positive
    valid = valid.astype(jnp.float32)
    return jnp.sum(per_local * valid) / jnp.maximum(valid.sum(), 1.0)


def avg_pool_locals(tokens: jax.Array, grid: int, out: int) -> jax.Array:
    """Patch locals [B, grid * grid, E] (row-major) average-pooled to [B, out * out, E] (TCL: 16 x 16 -> 4 x 4)."""
    if grid % out:
        raise ValueError(f"a {grid}x{grid} patch grid does not pool evenly to {out}x{out}; use a divisor of {grid}")
    b, _, e = tokens.shape
    f = grid // out
    return tokens.reshape(b, out, f, out, f, e).mean(axis=(2, 4)).reshape(b, out * out, e)
