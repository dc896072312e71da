"""MOFI's entity classification loss: softmax cross-entropy against the uniform distribution over each image's
entities (multi-label; one entity = ordinary softmax CE)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def multilabel_softmax_loss(logits: jax.Array, entities: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean over rows of -(1/|P_b|) sum_{e in P_b} log softmax(logits_b)_e.

    logits [B, E] (fp32 inside); entities int [B, M]: each row's entity ids, padded with -1 (>= 1 valid per row).
    Returns (loss, metrics) with `entity_top1`: the share of rows whose argmax is one of their entities."""
    logits = logits.astype(jnp.float32)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    valid = entities >= 0
    picked = jnp.take_along_axis(log_probs, jnp.maximum(entities, 0), axis=-1)  # [B, M]
    per_row = -jnp.sum(jnp.where(valid, picked, 0.0), -1) / jnp.maximum(valid.sum(-1), 1)
    top1 = jnp.argmax(logits, -1)[:, None]
    hit = jnp.any((entities == top1) & valid, axis=-1)
    loss = jnp.mean(per_row)
    return loss, {"loss_entity": loss, "entity_top1": jnp.mean(hit.astype(jnp.float32))}
