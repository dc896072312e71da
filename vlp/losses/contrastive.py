"""Contrastive image-text losses: the single-device reference and the sharded forms.

Embeddings are L2-normalised fp32 [B, D]; row i of `image_emb` and row i of `text_emb` are a positive pair.
`softmax_contrastive_loss` is the reference that every sharded variant is tested against. The sharded variants
run under `jax.shard_map` over the batch axes of the mesh:

- `gather`: each device computes its b local rows against all-gathered columns (b x B logits, as open_clip's
  `local_loss + gather_with_grad`). The gradient flows back through `all_gather` (its transpose is a
  reduce-scatter), so no device ever holds the B x B matrix.

`loss.variant` names the variant; a new one (e.g. the memory-bounded `ring`) is one more entry in
`SOFTMAX_VARIANTS`.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

Metrics = dict[str, jax.Array]


def _smoothed_cross_entropy_sum(logits: jax.Array, labels: jax.Array, label_smoothing: float) -> jax.Array:
    """Sum over rows of CE(softmax(logits), (1 - eps) * onehot(labels) + eps / C), logits [b, C], labels [b]."""
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(log_probs, labels[:, None], axis=-1)[:, 0]
    if label_smoothing:
        uniform = -log_probs.mean(axis=-1)
        nll = (1.0 - label_smoothing) * nll + label_smoothing * uniform
    return nll.sum()


def _correct(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return (jnp.argmax(logits, axis=-1) == labels).sum()


def softmax_contrastive_loss(
    image_emb: jax.Array, text_emb: jax.Array, logit_scale: jax.Array, label_smoothing: float = 0.0
) -> tuple[jax.Array, Metrics]:
    """Symmetric InfoNCE (CLIP; ALIGN with label smoothing 0.1) on one device.

    Args:
      image_emb: [B, D] L2-normalised image embeddings.
      text_emb: [B, D] L2-normalised text embeddings; row i pairs with image row i.
      logit_scale: scalar multiplier t (= 1 / temperature).
      label_smoothing: eps; targets are (1 - eps) * onehot + eps / B in both directions.
    Returns:
      (loss, metrics): loss = (CE(t X Y^T, I) + CE(t Y X^T, I)) / 2, a scalar; metrics has `loss_i2t`,
      `loss_t2i`, `acc_i2t`, `acc_t2i` (in-batch top-1) and `logit_scale`.
    """
    batch = image_emb.shape[0]
    logits = logit_scale * jnp.dot(image_emb.astype(jnp.float32), text_emb.astype(jnp.float32).T)
    labels = jnp.arange(batch)
    loss_i2t = _smoothed_cross_entropy_sum(logits, labels, label_smoothing) / batch
    loss_t2i = _smoothed_cross_entropy_sum(logits.T, labels, label_smoothing) / batch
    metrics = {
        "loss_i2t": loss_i2t,
        "loss_t2i": loss_t2i,
        "acc_i2t": _correct(logits, labels) / batch,
        "acc_t2i": _correct(logits.T, labels) / batch,
        "logit_scale": logit_scale,
    }
    return 0.5 * (loss_i2t + loss_t2i), metrics


def gather_local_rows_softmax_loss(
    image_emb: jax.Array,
    text_emb: jax.Array,
    logit_scale: jax.Array,
    label_smoothing: float,
    axis_names: tuple[str, ...],
) -> tuple[jax.Array, Metrics]:
    """Per-device body of the `gather` variant; call inside `shard_map` over `axis_names`.

    image_emb, text_emb: the local rows [b, D]. Returns the global loss and metrics (identical on every device).
    """
    local = image_emb.shape[0]
    all_text = jax.lax.all_gather(text_emb, axis_names, tiled=True)  # [B, D]
    all_image = jax.lax.all_gather(image_emb, axis_names, tiled=True)  # [B, D]
    batch = all_text.shape[0]
    labels = jax.lax.axis_index(axis_names) * local + jnp.arange(local)
    logits_i2t = logit_scale * jnp.dot(image_emb, all_text.T)  # [b, B]
    logits_t2i = logit_scale * jnp.dot(text_emb, all_image.T)  # [b, B]
    sums = {
        "loss_i2t": _smoothed_cross_entropy_sum(logits_i2t, labels, label_smoothing),
        "loss_t2i": _smoothed_cross_entropy_sum(logits_t2i, labels, label_smoothing),
        "acc_i2t": _correct(logits_i2t, labels),
        "acc_t2i": _correct(logits_t2i, labels),
    }
    metrics = {k: jax.lax.psum(v, axis_names) / batch for k, v in sums.items()}
    metrics["logit_scale"] = logit_scale
    return 0.5 * (metrics["loss_i2t"] + metrics["loss_t2i"]), metrics


SOFTMAX_VARIANTS: dict[str, Callable[..., tuple[jax.Array, Metrics]]] = {
    "gather": gather_local_rows_softmax_loss,
}


def sharded_softmax_contrastive_loss(
    image_emb: jax.Array,
    text_emb: jax.Array,
    logit_scale: jax.Array,
    label_smoothing: float = 0.0,
    *,
    mesh: Mesh | None = None,
    batch_axes: Sequence[str] = ("data", "fsdp"),
    variant: str = "gather",
) -> tuple[jax.Array, Metrics]:
    """`softmax_contrastive_loss` over the global batch, sharded on `batch_axes` of `mesh`.

    image_emb, text_emb: global [B, D] arrays (B divisible by the product of the batch axes). `mesh=None` takes
    the mesh set with `jax.set_mesh`. Equal to the single-device loss up to fp32 summation order.
    """
    if variant not in SOFTMAX_VARIANTS:
        raise ValueError(f"unknown contrastive loss variant {variant!r}; valid: {sorted(SOFTMAX_VARIANTS)}")
    axes = tuple(batch_axes)
    body = SOFTMAX_VARIANTS[variant]

    def per_device(img, txt, scale):
        return body(img, txt, scale, label_smoothing, axes)

    return jax.shard_map(
        per_device,
        mesh=mesh,
        in_specs=(P(axes), P(axes), P()),
        out_specs=(P(), P()),
    )(image_emb, text_emb, logit_scale)
