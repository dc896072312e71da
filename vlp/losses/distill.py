"""DINO / iBOT self-distillation: centred, sharpened teacher targets, EMA teacher updates and schedules.

Pure functions of arrays. Means over the batch are taken on the global (mesh-sharded) arrays, so under jit the
centre is the mean over the whole global batch (the compiler all-reduces over the batch axes of the mesh).
Shapes: CLS logits [B, K]; patch logits [B, N, K]; mask [B, N] (1 = masked); centres [K].
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp


def _cross_entropy(student: jax.Array, teacher: jax.Array, center: jax.Array, student_temp: float,
                   teacher_temp: jax.Array | float) -> jax.Array:
    """-sum_k softmax((t - c)/tau_t)_k log softmax(s/tau_s)_k over the last axis (teacher without gradient)."""
    targets = jax.nn.softmax((jax.lax.stop_gradient(teacher).astype(jnp.float32) - center) / teacher_temp, axis=-1)
    log_probs = jax.nn.log_softmax(student.astype(jnp.float32) / student_temp, axis=-1)
    return -(targets * log_probs).sum(-1)


def dino_loss(student: jax.Array, teacher: jax.Array, center: jax.Array, student_temp: float,
              teacher_temp: jax.Array | float) -> jax.Array:
    """DINO CLS loss, mean over the batch: student [B, K], teacher [B, K], center [K] -> scalar."""
    return _cross_entropy(student, teacher, center, student_temp, teacher_temp).mean()


def ibot_loss(student: jax.Array, teacher: jax.Array, center: jax.Array, mask: jax.Array, student_temp: float,
              teacher_temp: jax.Array | float) -> jax.Array:
    """iBOT masked-patch loss: mean over images of the mean over each image's masked patches.

    student, teacher [B, N, K]; center [K]; mask [B, N] (a mask of ones everywhere gives TIPSv2's iBOT++).
    Images without masked patches contribute 0.
    """
    ce = _cross_entropy(student, teacher, center, student_temp, teacher_temp)  # [B, N]
    m = mask.astype(jnp.float32)
    return ((ce * m).sum(-1) / jnp.maximum(m.sum(-1), 1.0)).mean()


def update_center(center: jax.Array, teacher: jax.Array, momentum: float) -> jax.Array:
    """c <- m c + (1 - m) mean(teacher) over every axis but the last (batch, and tokens for patch logits)."""
    batch_mean = jax.lax.stop_gradient(teacher).astype(jnp.float32).reshape(-1, teacher.shape[-1]).mean(0)
    return center * momentum + batch_mean * (1.0 - momentum)


def ema_update(teacher: Any, student: Any, momentum: jax.Array | float) -> Any:
    """theta_t <- m theta_t + (1 - m) theta_s, leaf by leaf (same tree, same shardings)."""
    return jax.tree.map(lambda t, s: t * momentum + jax.lax.stop_gradient(s) * (1.0 - momentum), teacher, student)


def teacher_temperature(step: jax.Array, start: float, end: float, warmup_steps: int) -> jax.Array:
    """DINO's teacher temperature: linear from `start` to `end` over `warmup_steps`, then `end`."""
    if warmup_steps <= 0:
        return jnp.asarray(end, jnp.float32)
    frac = jnp.clip(jnp.asarray(step, jnp.float32) / warmup_steps, 0.0, 1.0)
    return start + (end - start) * frac


def ema_momentum(step: jax.Array, total_steps: int, base: float, final: float) -> jax.Array:
    """Cosine schedule base -> final over `total_steps` (DINO); base == final gives a fixed momentum (SILC/TIPS)."""
    frac = jnp.clip(jnp.asarray(step, jnp.float32) / max(total_steps, 1), 0.0, 1.0)
    return final - (final - base) * (jnp.cos(math.pi * frac) + 1.0) / 2.0
