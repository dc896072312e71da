"""Captioning loss: teacher-forced next-token cross-entropy with padding ignored (CoCa's L_Cap, CapPa)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def caption_loss(logits: jax.Array, targets: jax.Array, pad_id: int = 0,
                 label_smoothing: float = 0.0) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean over the non-pad target tokens of the global batch of -log p(target).

    logits [B, L, V] (position t predicts targets[:, t] from the tokens before it), targets int [B, L]. Averaging
    over tokens of the whole (sharded) batch, not per row, matches open_clip's CrossEntropyLoss(ignore_index=pad)
    and makes the loss independent of how the batch is split over devices. Returns (loss, metrics) with the
    token accuracy of the argmax prediction.
    """
    logits = logits.astype(jnp.float32)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    if label_smoothing:
        nll = (1 - label_smoothing) * nll - label_smoothing * log_probs.mean(axis=-1)
    weight = (targets != pad_id).astype(jnp.float32)
    count = jnp.maximum(weight.sum(), 1.0)
    loss = (nll * weight).sum() / count
    accuracy = ((jnp.argmax(logits, axis=-1) == targets) * weight).sum() / count
    return loss, {"loss_caption": loss, "caption_token_accuracy": accuracy}
