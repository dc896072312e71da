"""Softmax InfoNCE: the single-device loss and its sharded `gather` form against an independent numpy reference."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlp.losses.contrastive import sharded_softmax_contrastive_loss, softmax_contrastive_loss
from vlp.parallel.mesh import make_mesh


def numpy_infonce(image, text, scale, eps):
    """Reference written from the definition, in float64, with explicit loops over rows."""
    image, text = image.astype(np.float64), text.astype(np.float64)
    batch = image.shape[0]

    def ce(logits):
        total = 0.0
        for i in range(batch):
            row = logits[i] - logits[i].max()
            log_probs = row - np.log(np.exp(row).sum())
            target = np.full(batch, eps / batch)
            target[i] += 1.0 - eps
            total += -(target * log_probs).sum()
        return total / batch

    logits = scale * image @ text.T
    return 0.5 * (ce(logits) + ce(logits.T))


def unit_rows(rng, batch, dim, correlated=0.0):
    x = rng.normal(size=(batch, dim))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def pair(batch, dim, seed):
    rng = np.random.default_rng(seed)
    image = unit_rows(rng, batch, dim)
    text = image + 0.8 * rng.normal(size=(batch, dim)) / math.sqrt(dim)  # positives are similar
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    return image.astype(np.float32), text.astype(np.float32)


@pytest.mark.parametrize("batch,dim,scale,eps", [(4, 8, 1.0, 0.0), (16, 32, 14.3, 0.0), (16, 32, 14.3, 0.1),
                                                 (64, 16, 100.0, 0.1), (33, 7, 5.0, 0.25)])
def test_loss_equals_numpy_reference(batch, dim, scale, eps):
    image, text = pair(batch, dim, seed=batch)
    loss, metrics = softmax_contrastive_loss(jnp.asarray(image), jnp.asarray(text), jnp.float32(scale), eps)
    expected = numpy_infonce(image, text, scale, eps)
    np.testing.assert_allclose(float(loss), expected, rtol=2e-5)
    np.testing.assert_allclose(0.5 * (float(metrics["loss_i2t"]) + float(metrics["loss_t2i"])), expected, rtol=2e-5)


def test_loss_is_symmetric_in_image_and_text():
    image, text = pair(16, 32, seed=1)
    a, _ = softmax_contrastive_loss(jnp.asarray(image), jnp.asarray(text), jnp.float32(10.0))
    b, _ = softmax_contrastive_loss(jnp.asarray(text), jnp.asarray(image), jnp.float32(10.0))
    np.testing.assert_allclose(float(a), float(b), rtol=1e-6)


@pytest.mark.parametrize("batch", [64, 1024])
def test_init_loss_is_log_batch(batch):
    # Random unit vectors in high dimension are nearly orthogonal: every logit ~ 0 at init -> loss ~ ln B.
    rng = np.random.default_rng(0)
    image, text = unit_rows(rng, batch, 4096), unit_rows(rng, batch, 4096)
    loss, _ = softmax_contrastive_loss(jnp.asarray(image, jnp.float32), jnp.asarray(text, jnp.float32),
                                       jnp.float32(1.0))
    assert abs(float(loss) - math.log(batch)) < 0.01 * math.log(batch)


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 4, 1), (1, 8, 1)])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_sharded_gather_equals_single_device(shape, eps):
    image, text = pair(32, 16, seed=7)
    scale = jnp.float32(12.0)

    def loss_grads(mesh):
        def f(img, txt, s):
            return sharded_softmax_contrastive_loss(img, txt, s, eps, mesh=mesh)[0]

        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))(jnp.asarray(image), jnp.asarray(text), scale)

    loss_1, grads_1 = loss_grads(make_mesh((1, 1, 1), num_devices=1))
    loss_8, grads_8 = loss_grads(make_mesh(shape))
    np.testing.assert_allclose(float(loss_1), numpy_infonce(image, text, 12.0, eps), rtol=2e-5)
    np.testing.assert_allclose(float(loss_8), float(loss_1), rtol=1e-5)
    for g1, g8 in zip(grads_1, grads_8):
        rel = np.linalg.norm(np.asarray(g8) - np.asarray(g1)) / np.linalg.norm(np.asarray(g1))
        assert rel < 1e-5


def test_sharded_loss_gathers_embeddings_in_hlo():
    mesh = make_mesh((2, 4, 1))
    image, text = pair(32, 16, seed=3)
    lowered = jax.jit(lambda a, b: sharded_softmax_contrastive_loss(a, b, jnp.float32(3.0), mesh=mesh)[0]).lower(
        jnp.asarray(image), jnp.asarray(text))
    hlo = lowered.compile().as_text()
    assert "all-gather" in hlo
    assert hlo.count("all-gather") >= 2  # image and text columns
