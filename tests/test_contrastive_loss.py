"""Contrastive losses (softmax InfoNCE and SigLIP's sigmoid): the single-device references against independent
numpy references, and every sharded variant (gather, ring) against the single-device loss on 8 virtual devices."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlp.losses import contrastive
from vlp.losses.contrastive import (LOSS_VARIANTS, sharded_contrastive_loss, sigmoid_contrastive_loss,
                                    softmax_contrastive_loss)
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


def numpy_sigmoid_loss(image, text, scale, bias):
    """-(1/B) sum_ij log sigmoid(z_ij (t x_i.y_j + b)), float64, with log(1 + exp(-x)) written out."""
    image, text = image.astype(np.float64), text.astype(np.float64)
    batch = image.shape[0]
    total = 0.0
    for i in range(batch):
        for j in range(batch):
            z = 1.0 if i == j else -1.0
            x = z * (scale * image[i] @ text[j] + bias)
            total += np.logaddexp(0.0, -x)
    return total / batch


def unit_rows(rng, batch, dim, correlated=0.0):
    x = rng.normal(size=(batch, dim))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def pair(batch, dim, seed):
    rng = np.random.default_rng(seed)
    image = unit_rows(rng, batch, dim)
    text = image + 0.8 * rng.normal(size=(batch, dim)) / math.sqrt(dim)  # positives are similar
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    return image.astype(np.float32), text.astype(np.float32)


# Scales where the logits matter (at scale 1 unit-vector logits lie in [-1, 1] and every loss is near ln B).
@pytest.mark.parametrize("batch,dim,scale,eps", [(4, 8, 1 / 0.07, 0.0), (16, 32, 14.3, 0.0), (16, 32, 14.3, 0.1),
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


@pytest.mark.parametrize("batch", [64, 256])
def test_init_loss_is_log_batch(batch):
    # Random unit vectors in high dimension are nearly orthogonal: every logit ~ 0 at init -> loss ~ ln B, at
    # CLIP's initial scale 1/0.07 too (logits ~ N(0, 14.3^2 / 4096)), where the value still depends on the logits.
    rng = np.random.default_rng(0)
    image, text = unit_rows(rng, batch, 4096), unit_rows(rng, batch, 4096)
    image, text = image.astype(np.float32), text.astype(np.float32)
    loss, _ = softmax_contrastive_loss(jnp.asarray(image), jnp.asarray(text), jnp.float32(1 / 0.07))
    np.testing.assert_allclose(float(loss), numpy_infonce(image, text, 1 / 0.07, 0.0), rtol=2e-5)
    assert abs(float(loss) - math.log(batch)) < 0.02 * math.log(batch)


@pytest.mark.parametrize("batch,dim,scale,bias", [(4, 8, 10.0, -10.0), (16, 32, 3.0, -2.0), (33, 7, 50.0, 5.0)])
def test_sigmoid_loss_equals_numpy_reference(batch, dim, scale, bias):
    image, text = pair(batch, dim, seed=batch)
    loss, metrics = sigmoid_contrastive_loss(jnp.asarray(image), jnp.asarray(text), jnp.float32(scale),
                                             jnp.float32(bias))
    expected = numpy_sigmoid_loss(image, text, scale, bias)
    np.testing.assert_allclose(float(loss), expected, rtol=2e-5)
    np.testing.assert_allclose(float(metrics["loss_pos"]) + float(metrics["loss_neg"]), expected, rtol=2e-5)


@pytest.mark.parametrize("batch", [1024, 4096])
def test_sigmoid_init_loss_matches_siglip_sanity_value(batch):
    # t = 10, b = -10 and cos ~ 0: log(1 + e^10) + (B - 1) log(1 + e^-10) = 10.00005 + (B - 1) * 4.54e-5.
    rng = np.random.default_rng(0)
    image, text = unit_rows(rng, batch, 2048), unit_rows(rng, batch, 2048)
    loss, _ = sigmoid_contrastive_loss(jnp.asarray(image, jnp.float32), jnp.asarray(text, jnp.float32),
                                       jnp.float32(10.0), jnp.float32(-10.0))
    expected = math.log1p(math.exp(10.0)) + (batch - 1) * math.log1p(math.exp(-10.0))
    assert abs(float(loss) - expected) < 0.02 * expected  # cos is ~N(0, 1/2048), not exactly 0


def reference(kind, image, text, scale, bias, eps):
    if kind == "softmax":
        return softmax_contrastive_loss(image, text, scale, eps)
    return sigmoid_contrastive_loss(image, text, scale, bias)


def global_norm_rel_diff(got, want):
    got = np.concatenate([np.ravel(np.asarray(g)) for g in got])
    want = np.concatenate([np.ravel(np.asarray(w)) for w in want])
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


CASES = [("softmax", 0.0), ("softmax", 0.1), ("sigmoid", 0.0)]
MESH_CASES = [("softmax", 0.1), ("sigmoid", 0.0)]  # label smoothing 0 is the same code path with eps = 0


@pytest.fixture(scope="module")
def embeddings():
    return pair(64, 16, seed=7)


@pytest.mark.parametrize("shape", [(8, 1, 1), (1, 8, 1), (2, 4, 1), (2, 2, 2)])
@pytest.mark.parametrize("variant", ["gather", "ring"])
@pytest.mark.parametrize("kind,eps", MESH_CASES)
def test_sharded_variant_equals_single_device(kind, eps, variant, shape, embeddings):
    image, text = (jnp.asarray(x) for x in embeddings)
    scale, bias = jnp.float32(12.0), jnp.float32(-4.0)
    args = (image, text, scale, bias)
    (loss_1, metrics_1), grads_1 = jax.value_and_grad(
        lambda *a: reference(kind, *a, eps), argnums=(0, 1, 2, 3), has_aux=True)(*args)
    mesh = make_mesh(shape)

    def sharded(*a):
        return sharded_contrastive_loss(kind, *a, label_smoothing=eps, mesh=mesh, variant=variant)

    (loss_8, metrics_8), grads_8 = jax.jit(jax.value_and_grad(sharded, argnums=(0, 1, 2, 3), has_aux=True))(*args)
    assert abs(float(loss_8) - float(loss_1)) / abs(float(loss_1)) <= 1e-5
    differentiable = 3 if kind == "softmax" else 4  # the softmax loss does not use the bias
    assert global_norm_rel_diff(grads_8[:differentiable], grads_1[:differentiable]) <= 1e-5
    assert set(metrics_8) == set(metrics_1)
    for name in metrics_1:
        np.testing.assert_allclose(float(metrics_8[name]), float(metrics_1[name]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind,eps", CASES)
def test_ring_in_row_chunks_equals_single_device(kind, eps, embeddings, monkeypatch):
    # Large local batches are processed in chunks of rows; force 2-row chunks of the 8 x 8 blocks.
    monkeypatch.setattr(contrastive, "RING_CHUNK_ELEMENTS", 16)
    image, text = (jnp.asarray(x) for x in embeddings)
    args = (image, text, jnp.float32(12.0), jnp.float32(-4.0))
    loss_1, grads_1 = jax.value_and_grad(lambda *a: reference(kind, *a, eps)[0], argnums=(0, 1, 2))(*args)
    mesh = make_mesh((8, 1, 1))
    loss_8, grads_8 = jax.jit(jax.value_and_grad(
        lambda *a: sharded_contrastive_loss(kind, *a, label_smoothing=eps, mesh=mesh, variant="ring")[0],
        argnums=(0, 1, 2)))(*args)
    assert abs(float(loss_8) - float(loss_1)) / abs(float(loss_1)) <= 1e-5
    assert global_norm_rel_diff(grads_8, grads_1) <= 1e-5


def hlo_computations(hlo: str) -> dict[str, str]:
    """Splits compiled HLO text into {computation name: body text}."""
    out, name = {}, None
    for line in hlo.splitlines():
        header = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
        if header:
            name = header.group(1)
            out[name] = ""
        elif name:
            out[name] += line + "\n"
    return out


def compiled_loss_and_grad_hlo(kind, variant, shape, batch=64, dim=16):
    mesh = make_mesh(shape)

    def loss(*a):
        return sharded_contrastive_loss(kind, *a, mesh=mesh, variant=variant)[0]

    emb, scalar = jax.ShapeDtypeStruct((batch, dim), jnp.float32), jax.ShapeDtypeStruct((), jnp.float32)
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3))).lower(emb, emb, scalar, scalar).compile().as_text()


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_gather_variant_all_gathers_and_never_permutes(kind):
    hlo = compiled_loss_and_grad_hlo(kind, "gather", (2, 4, 1))
    expected_gathers = 2 if kind == "softmax" else 1  # softmax gathers image and text columns, sigmoid only text
    assert len(re.findall(r"all-gather(?:-start)?\(", hlo)) == expected_gathers
    assert "collective-permute" not in hlo


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 2, 2)])
def test_ring_variant_permutes_n_minus_1_times_per_pass(kind, shape):
    hlo = compiled_loss_and_grad_hlo(kind, "ring", shape)
    ring_size = shape[0] * shape[1]
    assert "all-gather" not in hlo and "all-to-all" not in hlo
    computations = hlo_computations(hlo)
    loops = re.findall(r"while\(.*body=%?([\w.\-]+).*\"known_trip_count\":\{\"n\":\"(\d+)\"\}", hlo)
    permuting = [(body, int(n)) for body, n in loops if "collective-permute" in computations[body]]
    # Two ring passes (forward; backward recomputing the blocks), each a loop of n - 1 block shifts.
    assert len(permuting) == 2, loops
    assert all(n == ring_size - 1 for _, n in permuting)
    for body, _ in permuting:
        for line in computations[body].splitlines():
            if "collective-permute(" in line:  # every device sends one block and receives one
                pairs = re.search(r"source_target_pairs=\{(.*?)\}\}", line).group(1)
                assert pairs.count("{") == 8


def test_unknown_variant_and_missing_bias_are_clear_errors():
    image, text = (jnp.asarray(x) for x in pair(8, 4, seed=0))
    with pytest.raises(ValueError, match="valid: \\['gather', 'ring'\\]"):
        sharded_contrastive_loss("softmax", image, text, jnp.float32(1.0), variant="allgather",
                                 mesh=make_mesh((1, 1, 1), num_devices=1))
    with pytest.raises(ValueError, match="logit_bias"):
        sharded_contrastive_loss("sigmoid", image, text, jnp.float32(1.0), mesh=make_mesh((1, 1, 1), num_devices=1))
    assert sorted(LOSS_VARIANTS) == ["sigmoid", "softmax"]
