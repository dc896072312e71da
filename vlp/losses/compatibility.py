"""XBT's backward-compatibility loss: a new model's embeddings, projected into an old model's space, against the old
model's embeddings of the same examples (Jang & Lim, 2024, "Towards Cross-modal Backward-compatible Representation
Learning for Vision-Language Models")."""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from vlp.losses.contrastive import sharded_contrastive_loss
from vlp.losses.reference import embedding_cosine_loss

Metrics = dict[str, jax.Array]


def compatibility_loss(projected_emb: jax.Array, old_emb: jax.Array, logit_scale: jax.Array | float,
                       cosine_weight: float = 0.0, *, mesh: Mesh | None = None,
                       batch_axes: Sequence[str] = ("data", "fsdp")) -> tuple[jax.Array, Metrics]:
    """Symmetric InfoNCE between psi(new) rows and old rows over the global batch (row i of each is example i), plus
    `cosine_weight` * mean(1 - cos(psi(new)_i, old_i)).

    The InfoNCE makes each projected row pick its own old row out of the batch (a new query finds its item in an
    old gallery) and each old row pick its projected row; the cosine term pulls the pair together in absolute terms.

    Args:
      projected_emb: [B, D_old] L2-normalised psi(new model embeddings).
      old_emb: [B, D_old] L2-normalised old model embeddings; B divisible by the product of the batch axes.
      logit_scale: scalar t = 1 / temperature.
      mesh: None takes the mesh set with `jax.set_mesh`.
    Returns:
      (loss, metrics): scalar loss; metrics `loss_infonce`, `loss_cosine`, `acc_new2old`, `acc_old2new` (in-batch
      top-1 of each direction).
    """
    infonce, metrics = sharded_contrastive_loss("softmax", projected_emb, old_emb, jnp.float32(logit_scale),
                                                mesh=mesh, batch_axes=batch_axes)
    cosine = embedding_cosine_loss(projected_emb, old_emb)
    return infonce + cosine_weight * cosine, {"loss_infonce": infonce, "loss_cosine": cosine,
                                              "acc_new2old": metrics["acc_i2t"], "acc_old2new": metrics["acc_t2i"]}
