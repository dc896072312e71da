"""Symile (Saporta et al., 2024): contrastive learning over M >= 2 modalities with the multilinear inner product.

MIP(a, b, c, ...) = sum_d a_d * b_d * c_d * ...; for M = 2 it is the dot product, so Symile generalises CLIP and
targets the total correlation of the modalities (it sees a c = a XOR b dependence that pairwise losses cannot).
Written after the reference code (github.com/rajesh-lab/symile, `symile/losses.py`); see methods.md section 13.

The losses are plain functions of the global batch: under jit with batch-sharded inputs GSPMD partitions them, and
the O(N) shuffles are permutations of the global batch, so 1 device and a mesh see the same negatives.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NEGATIVE_SAMPLING = ("n", "n_squared")


def mip(*embs: jax.Array) -> jax.Array:
    """Multilinear inner product of M tensors [..., D] -> [...]."""
    product = embs[0]
    for emb in embs[1:]:
        product = product * emb
    return jnp.sum(product, axis=-1)


def _cross_entropy_diag(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy of logits [N, C] against integer labels [N]."""
    logits = logits.astype(jnp.float32)
    return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, labels[:, None], axis=-1)[:, 0])


def anchor_logits_n(anchor: jax.Array, others: list[jax.Array], perms: list[jax.Array] | None) -> jax.Array:
    """O(N) logits of one anchor modality [N, N] (before the logit scale): row i scores anchor_i against the
    products of the other modalities' rows, each shuffled by its own permutation [N] (None: identity, the CLIP
    case); the diagonal is overwritten by the positive MIP(anchor_i, others_i)."""
    if perms is None:
        shuffled = others
    else:
        shuffled = [other[perm] for other, perm in zip(others, perms, strict=True)]
    product = shuffled[0]
    for other in shuffled[1:]:
        product = product * other
    logits = anchor @ product.T
    n = anchor.shape[0]
    positive = mip(anchor, *others)
    return logits.at[jnp.arange(n), jnp.arange(n)].set(positive)


def anchor_logits_n_squared(anchor: jax.Array, others: list[jax.Array]) -> jax.Array:
    """O(N^2) logits of one anchor with exactly two other modalities: [N, N*N], column j*N + k scores
    anchor_i against others[0]_j * others[1]_k; the positive of row i sits in column i*N + i. Unlike the
    reference code's rolled products this keeps every combination once (the same set, another column order)."""
    if len(others) != 2:
        raise ValueError(f"O(N^2) negatives need exactly 3 modalities (2 non-anchor ones); got {len(others) + 1}")
    n = anchor.shape[0]
    return jnp.einsum("id,jd,kd->ijk", anchor, others[0], others[1]).reshape(n, n * n)


def symile_loss(embs: list[jax.Array], logit_scale: jax.Array, rng: jax.Array | None,
                negative_sampling: str = "n") -> tuple[jax.Array, dict[str, jax.Array]]:
    """Symile loss of M modalities' L2-normalised embeddings, each [N, D]: the mean over anchor modalities of the
    softmax cross-entropy of `logit_scale * logits`, the positive on the diagonal.

    `negative_sampling`: "n" (each non-anchor modality row-shuffled by its own permutation drawn from `rng`, fresh
    for every anchor; `rng=None` keeps the identity, which for M = 2 is CLIP's InfoNCE) or "n_squared" (all
    N^2 combinations of the two other modalities; M = 3 only). Returns (loss, metrics)."""
    if len(embs) < 2:
        raise ValueError(f"Symile needs >= 2 modalities; got {len(embs)}")
    if negative_sampling not in NEGATIVE_SAMPLING:
        raise ValueError(f"unknown negative_sampling {negative_sampling!r}; valid: {NEGATIVE_SAMPLING}")
    embs = [e.astype(jnp.float32) for e in embs]
    n = embs[0].shape[0]
    keys = None if rng is None else jax.random.split(rng, (len(embs), len(embs)))
    losses, accuracies = [], []
    for m, anchor in enumerate(embs):
        others = embs[:m] + embs[m + 1:]
        if negative_sampling == "n":
            perms = None if keys is None else [jax.random.permutation(keys[m, j], n) for j in range(len(others))]
            logits = anchor_logits_n(anchor, others, perms)
            labels = jnp.arange(n)
        else:
            logits = anchor_logits_n_squared(anchor, others)
            labels = jnp.arange(n) * (n + 1)
        logits = logit_scale * logits
        losses.append(_cross_entropy_diag(logits, labels))
        accuracies.append(jnp.mean(jnp.argmax(logits, axis=-1) == labels))
    loss = sum(losses) / len(embs)
    return loss, {"loss": loss, "symile_accuracy": sum(accuracies) / len(embs), "logit_scale": logit_scale}


def pairwise_clip_loss(embs: list[jax.Array], logit_scale: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The Symile paper's baseline: the SUM over modality pairs (a, b) of CLIP's symmetric InfoNCE
    (CE(t a b^T) + CE(t b a^T)) / 2 over embeddings [N, D] (reference `experiments/losses.py`)."""
    embs = [e.astype(jnp.float32) for e in embs]
    labels = jnp.arange(embs[0].shape[0])
    loss = jnp.zeros((), jnp.float32)
    for i in range(len(embs)):
        for j in range(i + 1, len(embs)):
            logits = logit_scale * embs[i] @ embs[j].T
            loss = loss + 0.5 * (_cross_entropy_diag(logits, labels) + _cross_entropy_diag(logits.T, labels))
    return loss, {"loss": loss, "logit_scale": logit_scale}


def pairwise_score(*embs: jax.Array) -> jax.Array:
    """Zero-shot score of the pairwise baseline: the sum of the pairwise dot products of M tensors [..., D]."""
    total = 0.0
    for i in range(len(embs)):
        for j in range(i + 1, len(embs)):
            total = total + jnp.sum(embs[i] * embs[j], axis=-1)
    return total
