"""ALIP's consistency gates and adaptive (per-sample weighted) contrastive loss (Yang et al., ICCV 2023).

Each example has one image embedding x_i and two text embeddings: the raw caption r_i and the synthetic caption c_i
(all L2-normalised, [B, D]). Three running means of cosine similarities (momentum state, initialised to 1 as in
deepglint/ALIP's train.py) track how consistent the batch usually is:

    m_rc <- (1 - a) m_rc + a mean_i <r_i, c_i>     (raw vs synthetic caption)
    m_rx <- (1 - a) m_rx + a mean_i <r_i, x_i>     (raw caption vs image)
    m_cx <- (1 - a) m_cx + a mean_i <c_i, x_i>     (synthetic caption vs image), a = 0.01.

Language consistency gate (per sample): w_i = min(exp(2 (<r_i, c_i> - m_rc)), 1): a raw caption that disagrees
with the synthetic one more than usual is down-weighted. Description consistency gate (per pair): where the sample
gate is open (exp(2 (<r_i, c_i> - m_rc)) >= 1) both pair weights are 1, otherwise p^r_i = exp(2 (<r_i, x_i> - m_rx))
and p^c_i = exp(2 (<c_i, x_i> - m_cx)) (not clipped: deepglint/ALIP's code, which the paper's equations leave open).
The updated means are used in the same step. The gates are computed without gradient.

Adaptive loss of one text path: L = (1/B) sum_i w_i p_i (CE_i2t(i) + CE_t2i(i)) / 2 with the CLIP logits t X T^T
over the global batch; ALIP's total is L(x, r; w, p^r) + L(x, c; w, p^c). With every weight 1 each term is CLIP's
InfoNCE.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

Metrics = dict[str, jax.Array]
MOMENTUM_NAMES = ("raw_caption", "raw_image", "caption_image")  # order of the momentum vector


def consistency_gates(image_emb: jax.Array, raw_emb: jax.Array, caption_emb: jax.Array, momenta: jax.Array,
                      rate: float) -> tuple[dict[str, jax.Array], jax.Array]:
    """ALIP's language and description consistency gates (no gradient).

    Args:
      image_emb, raw_emb, caption_emb: [B, D] L2-normalised; row i of each belongs to example i (global batch).
      momenta: [3] running mean similarities (`MOMENTUM_NAMES` order), 1.0 at the start of training.
      rate: the running means' update rate a (ALIP: 0.01).
    Returns:
      (weights, new_momenta): weights has `sample` [B] (language gate), `raw` and `caption` [B] (description gate
      of each text path); new_momenta [3].
    """
    image_emb, raw_emb, caption_emb, momenta = jax.lax.stop_gradient(
        tuple(jnp.asarray(a, jnp.float32) for a in (image_emb, raw_emb, caption_emb, momenta)))
    sims = jnp.stack([(raw_emb * caption_emb).sum(-1), (raw_emb * image_emb).sum(-1),
                      (caption_emb * image_emb).sum(-1)])  # [3, B]
    new_momenta = (1.0 - rate) * momenta + rate * sims.mean(axis=1)
    raw_weights = jnp.exp(2.0 * (sims - new_momenta[:, None]))  # exp(s - m) ** 2, as ALIP writes it
    gate_open = raw_weights[0] >= 1.0
    weights = {"sample": jnp.minimum(raw_weights[0], 1.0),
               "raw": jnp.where(gate_open, 1.0, raw_weights[1]),
               "caption": jnp.where(gate_open, 1.0, raw_weights[2])}
    return weights, new_momenta


def weighted_contrastive_loss(image_emb: jax.Array, text_emb: jax.Array, logit_scale: jax.Array,
                              weights: jax.Array) -> tuple[jax.Array, Metrics]:
    """ALIP's adaptive contrastive loss on one device (the reference of `sharded_weighted_contrastive_loss`).

    Args:
      image_emb, text_emb: [B, D] L2-normalised; row i of each is a positive pair.
      logit_scale: scalar t.
      weights: [B] per-example weights (treated as constants).
    Returns:
      (loss, metrics): loss = (1/B) sum_i weights_i (CE_i2t(i) + CE_t2i(i)) / 2; metrics has the unweighted
      `loss_i2t`, `loss_t2i` (each / B) and `weight_mean`.
    """
    image_emb, text_emb, logit_scale, weights = (jnp.asarray(a, jnp.float32)
                                                 for a in (image_emb, text_emb, logit_scale, weights))
    weights = jax.lax.stop_gradient(weights)
    logits = logit_scale * image_emb @ text_emb.T
    ce_i2t = -jnp.diagonal(jax.nn.log_softmax(logits, axis=1))
    ce_t2i = -jnp.diagonal(jax.nn.log_softmax(logits, axis=0))
    loss = jnp.mean(weights * 0.5 * (ce_i2t + ce_t2i))
    return loss, {"loss_i2t": ce_i2t.mean(), "loss_t2i": ce_t2i.mean(), "weight_mean": weights.mean()}


def _row_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """-log softmax(logits)[i, labels[i]] per row: logits [b, C], labels [b] -> [b]."""
    return -jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), labels[:, None], axis=-1)[:, 0]


def _weighted_gather(image_emb, text_emb, logit_scale, weights, axes):
    """Per-device body: local rows [b, D] against the all-gathered columns [B, D] (gradient through the gather)."""
    local = image_emb.shape[0]
    all_text = jax.lax.all_gather(text_emb, axes, tiled=True)
    all_image = jax.lax.all_gather(image_emb, axes, tiled=True)
    batch = all_text.shape[0]
    labels = jax.lax.axis_index(axes) * local + jnp.arange(local)
    ce_i2t = _row_cross_entropy(logit_scale * image_emb @ all_text.T, labels)  # [b]
    ce_t2i = _row_cross_entropy(logit_scale * text_emb @ all_image.T, labels)  # [b]
    sums = {"loss": (weights * 0.5 * (ce_i2t + ce_t2i)).sum(), "loss_i2t": ce_i2t.sum(), "loss_t2i": ce_t2i.sum(),
            "weight_mean": weights.sum()}
    metrics = {k: jax.lax.psum(v, axes) / batch for k, v in sums.items()}
    return metrics.pop("loss"), metrics


def sharded_weighted_contrastive_loss(image_emb: jax.Array, text_emb: jax.Array, logit_scale: jax.Array,
                                      weights: jax.Array, *, mesh: Mesh | None = None,
                                      batch_axes: Sequence[str] = ("data", "fsdp")) -> tuple[jax.Array, Metrics]:
    """`weighted_contrastive_loss` over the global batch sharded on `batch_axes` (the `gather` variant of
    vlp.losses.contrastive: b x B logits per device). Global [B, D] embeddings, [B] weights, scalar scale."""
    axes = tuple(batch_axes)
    weights = jax.lax.stop_gradient(jnp.asarray(weights, jnp.float32))
    image_emb, text_emb, logit_scale = (jnp.asarray(a, jnp.float32) for a in (image_emb, text_emb, logit_scale))
    return jax.shard_map(
        lambda img, txt, scale, w: _weighted_gather(img, txt, scale, w, axes),
        mesh=mesh, in_specs=(P(axes), P(axes), P(), P(axes)), out_specs=(P(), P()),
    )(image_emb, text_emb, logit_scale, weights)
