"""Optimizer from config: AdamW with linear warmup + cosine decay, weight-decay mask, global-norm clipping."""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import optax

SCHEDULES = ("cosine", "constant", "rsqrt")


def learning_rate_schedule(optim: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """Linear warmup to `lr`, then cosine to `lr * min_lr_ratio`, constant, or inverse square root."""
    if optim.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(
            0.0, optim.lr, optim.warmup_steps, total_steps, end_value=optim.lr * optim.min_lr_ratio)
    warmup = optax.linear_schedule(0.0, optim.lr, max(optim.warmup_steps, 1))
    if optim.schedule == "constant":
        after = optax.constant_schedule(optim.lr)
    elif optim.schedule == "rsqrt":
        after = lambda step: optim.lr * jax.lax.rsqrt(1.0 + step / max(optim.warmup_steps, 1))  # noqa: E731
    else:
        raise ValueError(f"unknown optim.schedule {optim.schedule!r}; valid: {SCHEDULES}")
    return optax.join_schedules([warmup, after], [optim.warmup_steps])


def decay_mask(params: Any) -> Any:
    """Weight decay on tensors of rank >= 2 only (as open_clip): not on biases, norm scales or the temperature.

    Works on boxed (nn.Partitioned) and plain trees alike, so optimizer-state shardings follow the params'.
    """
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(optim: ml_collections.ConfigDict, total_steps: int) -> tuple[optax.GradientTransformation,
                                                                             optax.Schedule]:
    if optim.name != "adamw":
        raise ValueError(f"unknown optim.name {optim.name!r}; valid: ['adamw']")
    schedule = learning_rate_schedule(optim, total_steps)
    parts = []
    if optim.grad_clip_norm:
        parts.append(optax.clip_by_global_norm(optim.grad_clip_norm))
    parts.append(optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps,
                             weight_decay=optim.weight_decay, mask=decay_mask))
    return optax.chain(*parts), schedule
