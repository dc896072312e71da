"""Optimizer from config: AdamW with linear warmup + cosine decay, weight-decay mask, global-norm clipping, and
frozen parameters (LiT)."""

from __future__ import annotations

import re
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


# Params that may have 2+ dimensions but are not weights (big_vision / timm `no_weight_decay`): biases (a fused
# qkv bias is [3, heads, head_dim]), norm scales, learned tokens (CLS, mask, the MAP head's probe query) and
# position embeddings.
NO_DECAY_NAMES = ("bias", "scale", "cls_token", "mask_token", "probe", "pos_embed")


def decay_mask(params: Any) -> Any:
    """Weight decay on matrices and conv kernels (linear kernels, the patch embedding, token embedding tables, DINO
    prototypes); none on 1-D/scalar params (biases, LayerNorm scales, logit scale and bias) and none on the tokens
    and position embeddings of NO_DECAY_NAMES (as big_vision and timm).

    Works on boxed (nn.Partitioned) and plain trees alike, so optimizer-state shardings follow the params'.
    """
    return jax.tree_util.tree_map_with_path(
        lambda path, p: p.ndim >= 2 and param_path(path).rsplit("/", 1)[-1] not in NO_DECAY_NAMES, params)


def param_path(path: tuple) -> str:
    """A tree path -> "image/encoder/block_0/attn/qkv/kernel" (dict keys only: nn.Partitioned boxes add none)."""
    return "/".join(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))


def frozen_labels(patterns: tuple[str, ...]):
    """A label function for optax.multi_transform: "frozen" where a param's path fully matches one of the regexes
    `patterns`, else "trained". A pattern that matches no parameter is an error naming the top-level names."""
    compiled = [re.compile(p) for p in patterns]

    def labels(params: Any) -> Any:
        paths = [param_path(path) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
        for pattern in compiled:
            if not any(pattern.fullmatch(p) for p in paths):
                tops = sorted({p.split("/")[0] for p in paths})
                raise ValueError(f"optim.freeze pattern {pattern.pattern!r} matches no parameter; parameter paths "
                                 f"look like {paths[0]!r}, top-level names: {tops} (e.g. 'image/.*' freezes the "
                                 "image tower)")
        return jax.tree_util.tree_map_with_path(
            lambda path, _: "frozen" if any(p.fullmatch(param_path(path)) for p in compiled) else "trained", params)

    return labels


def make_optimizer(optim: ml_collections.ConfigDict, total_steps: int) -> tuple[optax.GradientTransformation,
                                                                             optax.Schedule]:
    """AdamW (+ global-norm clipping) on the trained params; params matching `optim.freeze` get zero updates and
    no optimizer state (LiT: `optim.freeze=("image/.*",)` locks a pretrained image tower loaded with init_from)."""
    if optim.name != "adamw":
        raise ValueError(f"unknown optim.name {optim.name!r}; valid: ['adamw']")
    schedule = learning_rate_schedule(optim, total_steps)
    parts = []
    if optim.grad_clip_norm:
        parts.append(optax.clip_by_global_norm(optim.grad_clip_norm))
    parts.append(optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps,
                             weight_decay=optim.weight_decay, mask=decay_mask))
    optimizer = optax.chain(*parts)
    if optim.freeze:
        # Frozen grads are left out of the clipping norm too: the trained branch sees only its own params.
        optimizer = optax.multi_transform({"trained": optimizer, "frozen": optax.set_to_zero()},
                                          frozen_labels(tuple(optim.freeze)))
    return optimizer, schedule
