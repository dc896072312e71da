"""Gradient accumulation: one optimizer step over `steps` micro-batches of the global batch.

- `gradcache` (contrastive objectives; Gao et al., 2021): embed every micro-batch without keeping activations,
  compute the loss and its gradient with respect to the embeddings on the whole global batch, then re-run each
  micro-batch's forward and backpropagate its slice of the embedding gradient. The loss sees all B x B pairs, so
  the step equals the un-accumulated one (up to summation order) while activation memory is that of B / steps
  examples. Costs one extra forward pass.
- `plain`: average the gradients of the micro-batch losses. For a contrastive loss each micro-batch only sees its
  own B / steps negatives, which changes the objective: an explicit opt-in, not the default.

Micro-batch m holds rows m, m + steps, m + 2 steps, ... of the global batch, so each one stays spread over every
batch shard (each device keeps b / steps of its own rows); stitching the embeddings back restores the row order.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from vlp.objectives.base import Objective
from vlp.parallel.mesh import BATCH_AXES

MODES = ("gradcache", "plain")
GradFn = Callable[[Any, dict, jax.Array], tuple[tuple[jax.Array, dict], Any]]


def split_microbatches(x: jax.Array, steps: int) -> jax.Array:
    """[B, ...] -> [steps, B / steps, ...]; micro-batch m = rows m::steps, sharded like the batch on dim 1."""
    micro = x.reshape(x.shape[0] // steps, steps, *x.shape[1:]).swapaxes(0, 1)
    return jax.lax.with_sharding_constraint(micro, P(None, BATCH_AXES))


def merge_microbatches(x: jax.Array) -> jax.Array:
    """Inverse of `split_microbatches`: [steps, B / steps, ...] -> [B, ...] in the original row order."""
    steps, micro = x.shape[:2]
    return jax.lax.with_sharding_constraint(x.swapaxes(0, 1).reshape(steps * micro, *x.shape[2:]), P(BATCH_AXES))


def make_grad_fn(objective: Objective, steps: int, mode: str) -> GradFn:
    """`(params, batch, rng) -> ((loss, metrics), grads)` over the global batch, accumulated over `steps`."""
    if mode not in MODES:
        raise ValueError(f"unknown accumulation.mode {mode!r}; valid: {MODES}")
    direct = jax.value_and_grad(objective.loss_fn, has_aux=True)
    if steps == 1:
        return direct
    if mode == "plain":
        return _plain(direct, steps)
    if not callable(getattr(objective, "loss_from_embeddings", None)):
        raise ValueError(f"accumulation.mode='gradcache' needs an objective whose loss is computed from embeddings "
                         f"(embed + loss_from_embeddings); {type(objective).__name__} has none: use "
                         f"accumulation.mode='plain'")
    return _gradcache(objective, steps)


def _plain(direct: GradFn, steps: int) -> GradFn:
    def grad_fn(params, batch, rng):
        micro = jax.tree.map(lambda x: split_microbatches(x, steps), batch)

        def one(total, xs):
            index, microbatch = xs
            (loss, metrics), grads = direct(params, microbatch, jax.random.fold_in(rng, index))
            return jax.tree.map(jnp.add, total, (loss, metrics, grads)), None

        (loss, metrics), grads = direct(params, jax.tree.map(lambda x: x[0], micro), jax.random.fold_in(rng, 0))
        rest = jax.tree.map(lambda x: x[1:], micro)
        (loss, metrics, grads), _ = jax.lax.scan(one, (loss, metrics, grads), (jnp.arange(1, steps), rest))
        return jax.tree.map(lambda x: x / steps, ((loss, metrics), grads))

    return grad_fn


def _gradcache(objective: Any, steps: int) -> GradFn:
    def per_example(x: jax.Array) -> bool:  # embeddings [b, D] vs shared scalars (logit scale and bias)
        return jnp.ndim(x) > 0

    def grad_fn(params, batch, rng):
        del rng  # the embedding forward is deterministic
        micro = jax.tree.map(lambda x: split_microbatches(x, steps), batch)
        # 1. Embed every micro-batch; nothing is differentiated here, so no activations are kept.
        _, stacked = jax.lax.scan(lambda carry, mb: (carry, objective.embed(params, mb)), None, micro)
        full = jax.tree.map(lambda x: merge_microbatches(x) if per_example(x[0]) else x[0], stacked)
        # 2. Loss and embedding gradients on the whole global batch (all negatives).
        (loss, metrics), d_full = jax.value_and_grad(objective.loss_from_embeddings, has_aux=True)(full)
        # Shared outputs (logit scale, bias) get 1/steps of their cotangent per micro-batch: the sum is exact.
        d_micro = jax.tree.map(
            lambda d: split_microbatches(d, steps) if per_example(d) else jnp.broadcast_to(d / steps, (steps,)),
            d_full)

        # 3. Backpropagate each micro-batch's slice through its re-computed forward.
        def backprop(total, xs):
            microbatch, cotangent = xs
            _, vjp = jax.vjp(lambda p: objective.embed(p, microbatch), params)
            return jax.tree.map(jnp.add, total, vjp(cotangent)[0]), None

        zeros = jax.tree.map(jnp.zeros_like, params)
        grads, _ = jax.lax.scan(backprop, zeros, (micro, d_micro))
        return (loss, metrics), grads

    return grad_fn
