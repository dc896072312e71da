"""Contrastive image-text losses: single-device references and the sharded forms that training uses.

Embeddings are [B, D]; row i of `image_emb` and row i of `text_emb` are a positive pair. Two kinds of loss:

- `softmax`: symmetric InfoNCE (CLIP; ALIGN with label smoothing), reference `softmax_contrastive_loss`.
- `sigmoid`: pairwise binary loss (SigLIP), reference `sigmoid_contrastive_loss`.

Each kind has the same two sharded variants, chosen by `loss.variant` and run under `jax.shard_map` over the batch
axes of the mesh (n devices, b = B / n local rows):

- `gather`: local rows against all-gathered columns (b x B logits per device, as open_clip's
  `local_loss + gather_with_grad` and big_vision's all-gather sigmoid). The gradient flows back through
  `all_gather` (a reduce-scatter), so no device ever holds the B x B matrix; memory grows with B.
- `ring`: text blocks travel around the batch axes with `ppermute` and every device meets every block once. A
  two-pass `jax.custom_vjp`: the forward streams the blocks keeping only per-row statistics (the running
  logsumexp of each row and each column for softmax, as flash attention does; the running loss for sigmoid), the
  backward streams them again and recomputes each b x b block, in chunks of rows (`RING_CHUNK_ELEMENTS`). Per-device
  memory is O(b D + chunk x b), independent of n. Plain `jax.checkpoint` around a scanned ring step is not enough:
  the scan keeps every step's carry. Each pass is a loop of n - 1 block shifts (plus one shift that sends the
  accumulated column statistics or text gradients home).

The sharded variants equal the references up to fp32 summation order (tests/test_contrastive_loss.py).
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

Metrics = dict[str, jax.Array]
LossBody = Callable[..., tuple[jax.Array, Metrics]]


# ----------------------------------------------------------------------------------------------------------------
# Single-device references.

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


def _f32(*arrays: jax.Array) -> tuple[jax.Array, ...]:
    """Logits and losses are computed in fp32 whatever the compute dtype of the towers."""
    return tuple(jnp.asarray(a, jnp.float32) for a in arrays)


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
    image_emb, text_emb, logit_scale = _f32(image_emb, text_emb, logit_scale)
    batch = image_emb.shape[0]
    logits = logit_scale * jnp.dot(image_emb, text_emb.T)
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


def _sigmoid_terms(logits: jax.Array, positive: jax.Array) -> jax.Array:
    """-log sigmoid(z * logits) with z = +1 on positives and -1 elsewhere."""
    return -jax.nn.log_sigmoid(jnp.where(positive, logits, -logits))


def sigmoid_contrastive_loss(
    image_emb: jax.Array, text_emb: jax.Array, logit_scale: jax.Array, logit_bias: jax.Array
) -> tuple[jax.Array, Metrics]:
    """SigLIP's pairwise sigmoid loss on one device.

    Args:
      image_emb, text_emb: [B, D] L2-normalised embeddings; row i of each is a positive pair.
      logit_scale: scalar t (SigLIP: exp(t'), t' initialised to log 10); logit_bias: scalar b (init -10).
    Returns:
      (loss, metrics): loss = -(1/B) sum_ij log sigmoid(z_ij (t x_i.y_j + b)), z_ij = 1 if i == j else -1.
      At init (t = 10, b = -10, near-orthogonal embeddings) it is about 10 + (B - 1) * 4.54e-5. metrics has
      `loss_pos` and `loss_neg` (the two parts of the sum, each / B), `logit_scale` and `logit_bias`.
    """
    image_emb, text_emb, logit_scale, logit_bias = _f32(image_emb, text_emb, logit_scale, logit_bias)
    batch = image_emb.shape[0]
    logits = logit_scale * jnp.dot(image_emb, text_emb.T) + logit_bias
    eye = jnp.eye(batch, dtype=bool)
    terms = _sigmoid_terms(logits, eye)
    loss_pos = jnp.where(eye, terms, 0.0).sum() / batch
    loss_neg = jnp.where(eye, 0.0, terms).sum() / batch
    metrics = {"loss_pos": loss_pos, "loss_neg": loss_neg, "logit_scale": logit_scale, "logit_bias": logit_bias}
    return loss_pos + loss_neg, metrics


# ----------------------------------------------------------------------------------------------------------------
# Per-device bodies; each runs inside `shard_map` over `axes` and returns the global loss and metrics, identical
# on every device. Arguments: local image and text rows [b, D], scalar scale (and bias), static options.

def _global_row_ids(local: int, axes: tuple[str, ...]) -> jax.Array:
    return jax.lax.axis_index(axes) * local + jnp.arange(local)


def _softmax_gather(image_emb, text_emb, logit_scale, logit_bias, label_smoothing, axes):
    del logit_bias
    local = image_emb.shape[0]
    all_text = jax.lax.all_gather(text_emb, axes, tiled=True)  # [B, D]
    all_image = jax.lax.all_gather(image_emb, axes, tiled=True)  # [B, D]
    batch = all_text.shape[0]
    labels = _global_row_ids(local, axes)
    logits_i2t = logit_scale * jnp.dot(image_emb, all_text.T)  # [b, B]
    logits_t2i = logit_scale * jnp.dot(text_emb, all_image.T)  # [b, B]
    sums = {
        "loss_i2t": _smoothed_cross_entropy_sum(logits_i2t, labels, label_smoothing),
        "loss_t2i": _smoothed_cross_entropy_sum(logits_t2i, labels, label_smoothing),
        "acc_i2t": _correct(logits_i2t, labels),
        "acc_t2i": _correct(logits_t2i, labels),
    }
    metrics = {k: jax.lax.psum(v, axes) / batch for k, v in sums.items()}
    metrics["logit_scale"] = logit_scale
    return 0.5 * (metrics["loss_i2t"] + metrics["loss_t2i"]), metrics


def _sigmoid_gather(image_emb, text_emb, logit_scale, logit_bias, label_smoothing, axes):
    del label_smoothing
    local = image_emb.shape[0]
    all_text = jax.lax.all_gather(text_emb, axes, tiled=True)  # [B, D]
    batch = all_text.shape[0]
    logits = logit_scale * jnp.dot(image_emb, all_text.T) + logit_bias  # [b, B]
    positive = _global_row_ids(local, axes)[:, None] == jnp.arange(batch)[None, :]
    terms = _sigmoid_terms(logits, positive)
    loss_pos = jax.lax.psum(jnp.where(positive, terms, 0.0).sum(), axes) / batch
    loss_neg = jax.lax.psum(jnp.where(positive, 0.0, terms).sum(), axes) / batch
    metrics = {"loss_pos": loss_pos, "loss_neg": loss_neg, "logit_scale": logit_scale, "logit_bias": logit_bias}
    return loss_pos + loss_neg, metrics


# ---- ring: the shared streaming skeleton ----

# Each ring step handles its b x b block in chunks of rows of at most this many logits (16 MiB in fp32), so the
# per-device memory does not grow with the square of the local batch.
RING_CHUNK_ELEMENTS = 2**22


def _axis_size(axes: tuple[str, ...]) -> int:
    return jax.lax.axis_size(axes)


def _shift(tree, axes: tuple[str, ...], size: int):
    """Sends every device's blocks to the previous device along `axes` (one collective-permute per array)."""
    perm = [(i, (i - 1) % size) for i in range(size)]
    return jax.tree.map(lambda x: jax.lax.ppermute(x, axes, perm), tree)


def _varying(x: jax.Array, axes: tuple[str, ...]) -> jax.Array:
    """Marks a value built from constants as per-device (shard_map's type check requires it for loop carries)."""
    return jax.lax.pcast(x, axes, to="varying")


def _ring(step: Callable, resident, visiting, home_bound, axes: tuple[str, ...], size: int):
    """Runs `step(own_block, resident, visiting, home_bound) -> (resident, home_bound)` for k = 0..size-1.

    At step k a device holds the `visiting` blocks of device (index + k) % size; `own_block` (a Python bool, so
    the positives' diagonal costs nothing in the loop) is True only at k = 0. `resident` accumulates this device's
    own results; `home_bound` accumulates results about the visiting blocks and travels with them. The loop shifts
    (visiting, home_bound) size - 1 times; one last shift brings each `home_bound` back to the device whose
    blocks it describes.
    """
    def body(_, carry):
        resident, visiting, home_bound = carry
        visiting, home_bound = _shift((visiting, home_bound), axes, size)
        resident, home_bound = step(False, resident, visiting, home_bound)
        return resident, visiting, home_bound

    resident, home_bound = step(True, resident, visiting, home_bound)
    resident, visiting, home_bound = jax.lax.fori_loop(1, size, body, (resident, visiting, home_bound))
    return resident, _shift(home_bound, axes, size)


def _chunk_rows(rows: int, cols: int) -> int:
    """The largest divisor of `rows` whose chunk of logits (chunk x cols) fits RING_CHUNK_ELEMENTS (at least 1)."""
    best = 1
    for chunk in range(1, rows + 1):
        if rows % chunk == 0 and chunk * cols <= RING_CHUNK_ELEMENTS:
            best = chunk
    return best


def _over_row_chunks(rows: int, cols: int, body: Callable, carry):
    """carry = body(offset, chunk, carry) for each chunk of local rows; a plain call when one chunk fits."""
    chunk = _chunk_rows(rows, cols)
    if chunk == rows:
        return body(0, chunk, carry)
    return jax.lax.fori_loop(0, rows // chunk, lambda i, c: body(i * chunk, chunk, c), carry)


def _rows(x: jax.Array, offset, chunk: int) -> jax.Array:
    return jax.lax.dynamic_slice_in_dim(x, offset, chunk, axis=0)


def _add_rows(x: jax.Array, update: jax.Array, offset) -> jax.Array:
    return jax.lax.dynamic_update_slice_in_dim(x, _rows(x, offset, update.shape[0]) + update, offset, axis=0)


def _positives(offset, chunk: int, cols: int, own_block: bool) -> jax.Array:
    """[chunk, cols] mask of the positive pairs of local rows offset..offset+chunk against a text block."""
    if not own_block:
        return jnp.zeros((chunk, cols), bool)
    return (offset + jnp.arange(chunk))[:, None] == jnp.arange(cols)[None, :]


def _online_lse(state, logits, axis):
    """Folds a block of logits into a running (max, sum of exp(x - max)) along `axis`."""
    running_max, running_sum = state
    new_max = jnp.maximum(running_max, logits.max(axis=axis))
    expanded = new_max[:, None] if axis == 1 else new_max[None, :]
    running_sum = running_sum * jnp.exp(running_max - new_max) + jnp.exp(logits - expanded).sum(axis=axis)
    return new_max, running_sum


# ---- ring softmax ----

def _softmax_ring_forward(image_emb, text_emb, logit_scale, label_smoothing, axes):
    """Returns the local partial sums (i2t, t2i, correct_i2t, correct_t2i) and the residuals for the backward."""
    size = _axis_size(axes)
    local = image_emb.shape[0]
    batch = local * size
    vector = lambda value: _varying(jnp.full((local,), value, jnp.float32), axes)  # noqa: E731

    def step(own_block, resident, text_block, col_stats):
        def chunk_body(offset, chunk, carry):
            (row_max, row_sum, diag), col_stats = carry
            logits = logit_scale * jnp.dot(_rows(image_emb, offset, chunk), text_block.T)  # [chunk, b]
            new_max, new_sum = _online_lse((_rows(row_max, offset, chunk), _rows(row_sum, offset, chunk)),
                                           logits, axis=1)
            put = lambda x, v: jax.lax.dynamic_update_slice_in_dim(x, v, offset, axis=0)  # noqa: E731
            if own_block:  # positive logits, from the same matmul as the maxima they are compared with
                positives = _positives(offset, chunk, local, True)
                diag = put(diag, jnp.sum(jnp.where(positives, logits, 0.0), axis=1))
            return (put(row_max, new_max), put(row_sum, new_sum), diag), _online_lse(col_stats, logits, axis=0)

        return _over_row_chunks(local, local, chunk_body, (resident, col_stats))

    col_init = (vector(-jnp.inf), vector(0.0))
    (row_max, row_sum, diag), (col_max, col_sum) = _ring(
        step, (vector(-jnp.inf), vector(0.0), vector(0.0)), text_emb, col_init, axes, size)
    row_lse = row_max + jnp.log(row_sum)  # i2t: each local image row over all texts
    col_lse = col_max + jnp.log(col_sum)  # t2i: each local text row over all images
    # Label smoothing's uniform term needs the mean logit of each row: t x_i . mean(Y), no block streaming.
    mean_text = jax.lax.psum(text_emb.sum(0), axes) / batch
    mean_image = jax.lax.psum(image_emb.sum(0), axes) / batch
    eps = label_smoothing
    i2t = row_lse - (1 - eps) * diag - eps * logit_scale * (image_emb @ mean_text)
    t2i = col_lse - (1 - eps) * diag - eps * logit_scale * (text_emb @ mean_image)
    # A row is correct when its positive is its largest logit (argmax ties have measure zero for real data).
    sums = (i2t.sum(), t2i.sum(), (diag >= row_max).sum().astype(jnp.float32),
            (diag >= col_max).sum().astype(jnp.float32))
    return sums, (row_lse, col_lse)


def _softmax_ring_backward(image_emb, text_emb, logit_scale, label_smoothing, axes, row_lse, col_lse, g_i2t,
                           g_t2i):
    """Gradients of g_i2t * sum_i loss_i2t_i + g_t2i * sum_j loss_t2i_j (summed over all devices' rows)."""
    size = _axis_size(axes)
    local = image_emb.shape[0]
    batch = local * size
    eps = label_smoothing
    zeros = lambda x: _varying(jnp.zeros(x.shape, x.dtype), axes)  # noqa: E731
    # g_i2t / g_t2i are per-device cotangents of per-device partial sums; the visiting block's t2i cotangent
    # travels with it, as does its column logsumexp.
    visiting = (text_emb, col_lse, g_t2i * jnp.ones((local,), jnp.float32))

    def step(own_block, resident, visiting, d_text):
        text_block, text_lse, text_g = visiting

        def chunk_body(offset, chunk, carry):
            (d_image, d_scale), d_text = carry
            image_rows = _rows(image_emb, offset, chunk)
            scores = jnp.dot(image_rows, text_block.T)  # [chunk, b]
            logits = logit_scale * scores
            target = eps / batch + (1 - eps) * _positives(offset, chunk, local, own_block)
            # d loss / d logits: row softmax (i2t, local image rows) + column softmax (t2i, visiting text rows).
            d_logits = (g_i2t * (jnp.exp(logits - _rows(row_lse, offset, chunk)[:, None]) - target)
                        + text_g[None, :] * (jnp.exp(logits - text_lse[None, :]) - target))
            d_scores = logit_scale * d_logits
            d_image = _add_rows(d_image, d_scores @ text_block, offset)
            return (d_image, d_scale + jnp.sum(d_logits * scores)), d_text + d_scores.T @ image_rows

        return _over_row_chunks(local, local, chunk_body, (resident, d_text))

    resident = (zeros(image_emb), zeros(logit_scale))
    (d_image, d_scale), d_text = _ring(step, resident, visiting, zeros(text_emb), axes, size)
    return d_image, d_text, d_scale


def _make_softmax_ring(label_smoothing: float, axes: tuple[str, ...]):
    @jax.custom_vjp
    def partial_sums(image_emb, text_emb, logit_scale):
        return _softmax_ring_forward(image_emb, text_emb, logit_scale, label_smoothing, axes)[0]

    def fwd(image_emb, text_emb, logit_scale):
        sums, (row_lse, col_lse) = _softmax_ring_forward(image_emb, text_emb, logit_scale, label_smoothing, axes)
        return sums, (image_emb, text_emb, logit_scale, row_lse, col_lse)

    def bwd(residuals, cotangents):
        image_emb, text_emb, logit_scale, row_lse, col_lse = residuals
        g_i2t, g_t2i, _, _ = cotangents  # the accuracy counts are not differentiable
        return _softmax_ring_backward(image_emb, text_emb, logit_scale, label_smoothing, axes, row_lse, col_lse,
                                      g_i2t, g_t2i)

    partial_sums.defvjp(fwd, bwd)
    return partial_sums


def _softmax_ring(image_emb, text_emb, logit_scale, logit_bias, label_smoothing, axes):
    del logit_bias
    batch = image_emb.shape[0] * _axis_size(axes)
    sums = _make_softmax_ring(label_smoothing, axes)(image_emb, text_emb, _varying(logit_scale, axes))
    loss_i2t, loss_t2i, acc_i2t, acc_t2i = (jax.lax.psum(s, axes) / batch for s in sums)
    metrics = {"loss_i2t": loss_i2t, "loss_t2i": loss_t2i, "acc_i2t": acc_i2t, "acc_t2i": acc_t2i,
               "logit_scale": logit_scale}
    return 0.5 * (loss_i2t + loss_t2i), metrics


# ---- ring sigmoid ----

def _sigmoid_ring_forward(image_emb, text_emb, logit_scale, logit_bias, axes):
    size = _axis_size(axes)
    local = image_emb.shape[0]
    zero = _varying(jnp.zeros((), jnp.float32), axes)

    def step(own_block, sums, text_block, unused):
        def chunk_body(offset, chunk, sums):
            logits = logit_scale * jnp.dot(_rows(image_emb, offset, chunk), text_block.T) + logit_bias
            positives = _positives(offset, chunk, local, own_block)
            terms = _sigmoid_terms(logits, positives)
            pos, neg = sums
            return pos + jnp.where(positives, terms, 0.0).sum(), neg + jnp.where(positives, 0.0, terms).sum()

        return _over_row_chunks(local, local, chunk_body, sums), unused

    sums, _ = _ring(step, (zero, zero), text_emb, (), axes, size)
    return sums


def _sigmoid_ring_backward(image_emb, text_emb, logit_scale, logit_bias, axes, g_pos, g_neg):
    size = _axis_size(axes)
    local = image_emb.shape[0]
    zeros = lambda x: _varying(jnp.zeros(x.shape, x.dtype), axes)  # noqa: E731

    def step(own_block, resident, text_block, d_text):
        def chunk_body(offset, chunk, carry):
            (d_image, d_scale, d_bias), d_text = carry
            image_rows = _rows(image_emb, offset, chunk)
            scores = jnp.dot(image_rows, text_block.T)  # [chunk, b]
            logits = logit_scale * scores + logit_bias
            positives = _positives(offset, chunk, local, own_block)
            # d/dx [-log sigmoid(z x)] = -z sigmoid(-z x), weighted by the cotangent of the part it belongs to.
            signed = jnp.where(positives, logits, -logits)
            d_logits = jnp.where(positives, -g_pos, g_neg) * jax.nn.sigmoid(-signed)
            d_scores = logit_scale * d_logits
            resident = (_add_rows(d_image, d_scores @ text_block, offset), d_scale + jnp.sum(d_logits * scores),
                        d_bias + jnp.sum(d_logits))
            return resident, d_text + d_scores.T @ image_rows

        return _over_row_chunks(local, local, chunk_body, (resident, d_text))

    resident = (zeros(image_emb), zeros(logit_scale), zeros(logit_bias))
    (d_image, d_scale, d_bias), d_text = _ring(step, resident, text_emb, zeros(text_emb), axes, size)
    return d_image, d_text, d_scale, d_bias


def _make_sigmoid_ring(axes: tuple[str, ...]):
    @jax.custom_vjp
    def partial_sums(image_emb, text_emb, logit_scale, logit_bias):
        return _sigmoid_ring_forward(image_emb, text_emb, logit_scale, logit_bias, axes)

    def fwd(image_emb, text_emb, logit_scale, logit_bias):
        sums = _sigmoid_ring_forward(image_emb, text_emb, logit_scale, logit_bias, axes)
        return sums, (image_emb, text_emb, logit_scale, logit_bias)

    def bwd(residuals, cotangents):
        return _sigmoid_ring_backward(*residuals, axes, *cotangents)

    partial_sums.defvjp(fwd, bwd)
    return partial_sums


def _sigmoid_ring(image_emb, text_emb, logit_scale, logit_bias, label_smoothing, axes):
    del label_smoothing
    batch = image_emb.shape[0] * _axis_size(axes)
    sums = _make_sigmoid_ring(axes)(image_emb, text_emb, _varying(logit_scale, axes), _varying(logit_bias, axes))
    loss_pos, loss_neg = (jax.lax.psum(s, axes) / batch for s in sums)
    metrics = {"loss_pos": loss_pos, "loss_neg": loss_neg, "logit_scale": logit_scale, "logit_bias": logit_bias}
    return loss_pos + loss_neg, metrics


# ----------------------------------------------------------------------------------------------------------------
# The entry point the objectives call.

LOSS_VARIANTS: dict[str, dict[str, LossBody]] = {
    "softmax": {"gather": _softmax_gather, "ring": _softmax_ring},
    "sigmoid": {"gather": _sigmoid_gather, "ring": _sigmoid_ring},
}


def sharded_contrastive_loss(
    kind: str,
    image_emb: jax.Array,
    text_emb: jax.Array,
    logit_scale: jax.Array,
    logit_bias: jax.Array | None = None,
    *,
    label_smoothing: float = 0.0,
    mesh: Mesh | None = None,
    batch_axes: Sequence[str] = ("data", "fsdp"),
    variant: str = "gather",
) -> tuple[jax.Array, Metrics]:
    """The `kind` ("softmax" | "sigmoid") contrastive loss over the global batch, sharded on `batch_axes`.

    Args:
      image_emb, text_emb: global [B, D] arrays (any float dtype; the loss runs in fp32), B divisible by the
        product of the batch axes.
      logit_scale: scalar t; logit_bias: scalar b (sigmoid only).
      label_smoothing: softmax only.
      mesh: None takes the mesh set with `jax.set_mesh`.
      variant: "gather" or "ring" (see the module docstring).
    Returns:
      (loss, metrics) equal to `softmax_contrastive_loss` / `sigmoid_contrastive_loss` on the whole batch.
    """
    if kind not in LOSS_VARIANTS:
        raise ValueError(f"unknown contrastive loss kind {kind!r}; valid: {sorted(LOSS_VARIANTS)}")
    if variant not in LOSS_VARIANTS[kind]:
        raise ValueError(f"unknown contrastive loss variant {variant!r}; valid: {sorted(LOSS_VARIANTS[kind])}")
    if kind == "sigmoid" and logit_bias is None:
        raise ValueError("the sigmoid loss needs a logit_bias (the model's `logit_bias_init` must be set)")
    if kind == "softmax" and logit_bias is None:
        logit_bias = jnp.zeros((), jnp.float32)
    axes = tuple(batch_axes)
    body = LOSS_VARIANTS[kind][variant]
    image_emb, text_emb, logit_scale, logit_bias = _f32(image_emb, text_emb, logit_scale, logit_bias)

    def per_device(img, txt, scale, bias):
        return body(img, txt, scale, bias, label_smoothing, axes)

    return jax.shard_map(
        per_device,
        mesh=mesh,
        in_specs=(P(axes), P(axes), P(), P()),
        out_specs=(P(), P()),
    )(image_emb, text_emb, logit_scale, logit_bias)
