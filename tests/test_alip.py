"""ALIP: the two consistency gates and the adaptive loss against numpy, the reduction to two InfoNCE terms when every
weight is 1, and one sharded step (mesh 2x4x1) equal to one device (loss, every gradient leaf, the gates' state)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO

from vlp import config as vlp_config
from vlp.losses.adaptive import consistency_gates, weighted_contrastive_loss
from vlp.losses.contrastive import softmax_contrastive_loss
from vlp.parallel import sharding
from vlp.train.trainer import build_experiment

RAW = ["red circle left", "blue square", "green triangle right", "a star", "yellow star", "red", "circle top img",
       "blue", "green circle", "red square low", "triangle blue", "yellow", "green star up", "purple img", "square",
       "blue triangle"]
SYNTHETIC = ["a large red circle in the upper left", "a small blue square in the lower right",
             "a small green triangle on the right", "a large yellow star in the centre"] * 4


def alip_config(**updates):
    config = vlp_config.load_config_file(str(REPO / "configs" / "alip.py") + ":tiny")
    config.model.image.update(width=32, depth=1, mlp_dim=64, num_heads=2)
    config.model.text.update(width=32, depth=1, mlp_dim=64, num_heads=2)
    config.model.embed_dim = 32
    config.batch_size = 16
    config.mesh.num_devices = 1
    vlp_config.apply_overrides(config, {k: str(v) for k, v in updates.items()})
    return config


def unit_rows(rng, n, d):
    x = rng.randn(n, d).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def np_gates(img, raw, cap, momenta, rate):
    """deepglint/ALIP train.py, line by line in numpy: running means first, then the gates."""
    m_text = momenta[0] * (1 - rate) + rate * np.mean(np.sum(raw * cap, 1))
    m_raw = momenta[1] * (1 - rate) + rate * np.mean(np.sum(raw * img, 1))
    m_cap = momenta[2] * (1 - rate) + rate * np.mean(np.sum(cap * img, 1))
    sample_raw = np.exp(np.sum(raw * cap, 1) - m_text) ** 2
    sample = np.where(sample_raw < 1, sample_raw, 1.0)
    pair_raw = np.where(sample_raw < 1, np.exp(np.sum(raw * img, 1) - m_raw) ** 2, 1.0)
    pair_cap = np.where(sample_raw < 1, np.exp(np.sum(cap * img, 1) - m_cap) ** 2, 1.0)
    return sample, pair_raw, pair_cap, np.array([m_text, m_raw, m_cap])


def np_weighted_loss(img, txt, scale, weights):
    logits = (scale * img.astype(np.float64) @ txt.T.astype(np.float64))
    row = logits - logits.max(1, keepdims=True)
    col = logits - logits.max(0, keepdims=True)
    ce_i2t = -(np.diag(row) - np.log(np.exp(row).sum(1)))
    ce_t2i = -(np.diag(col) - np.log(np.exp(col).sum(0)))
    return np.mean(weights * (ce_i2t + ce_t2i) / 2)


def test_gates_match_numpy_reference():
    rng = np.random.RandomState(0)
    img, raw, cap = (unit_rows(rng, 32, 8) for _ in range(3))
    cap[:8] = raw[:8]  # consistent captions: their sample gate opens, their pair weights are 1
    momenta = np.array([0.3, 0.05, -0.02], np.float32)
    weights, new = consistency_gates(img, raw, cap, momenta, 0.01)
    sample, pair_raw, pair_cap, want_momenta = np_gates(img, raw, cap, momenta, 0.01)
    np.testing.assert_allclose(new, want_momenta, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(weights["sample"], sample, rtol=1e-5)
    np.testing.assert_allclose(weights["raw"], pair_raw, rtol=1e-5)
    np.testing.assert_allclose(weights["caption"], pair_cap, rtol=1e-5)
    assert np.all(sample <= 1) and 0 < np.sum(sample == 1) < 32  # both gate states occur
    assert np.any(pair_raw > 1) and np.any(pair_raw < 1)  # pair weights are not clipped where the gate is shut


def test_weighted_loss_matches_numpy_and_unit_weights_give_infonce():
    rng = np.random.RandomState(1)
    img, txt = unit_rows(rng, 24, 16), unit_rows(rng, 24, 16)
    txt[:12] = img[:12] * 0.8 + txt[:12] * 0.2
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    weights = rng.uniform(0.1, 2.0, 24).astype(np.float32)
    loss, _ = weighted_contrastive_loss(img, txt, jnp.float32(10.0), weights)
    np.testing.assert_allclose(float(loss), np_weighted_loss(img, txt, 10.0, weights), rtol=1e-5)
    unit, _ = weighted_contrastive_loss(img, txt, jnp.float32(10.0), np.ones(24, np.float32))
    clip, _ = softmax_contrastive_loss(img, txt, jnp.float32(10.0))
    np.testing.assert_allclose(float(unit), float(clip), rtol=1e-6)


def make_batch(tokenizer, n=16, max_len=12):
    rng = np.random.RandomState(0)
    return {"image": rng.randn(n, 32, 32, 3).astype(np.float32), "text_noisy": tokenizer.encode(RAW[:n], max_len),
            "text_synthetic": tokenizer.encode(SYNTHETIC[:n], max_len), "label": np.zeros((n,), np.int32)}


def _step_fn(mesh_shape, num_devices, params=None):
    """(exp, jitted (momenta, batch) -> (loss, metrics, aux, grads), params): one compile per mesh."""
    exp = build_experiment(alip_config(**{"mesh.shape": str(mesh_shape), "mesh.num_devices": num_devices}))
    with exp.context():
        state = exp.init_state()
        if params is not None:
            state = state.replace(params=jax.device_put(params, exp.state_shardings.params))

        def loss(p, momenta, b):
            value, (metrics, aux) = exp.objective.loss_fn_with_extra(p, {"momenta": momenta}, b, jax.random.key(0),
                                                                     state.step)
            return value, (metrics, aux)

        grad_fn = jax.jit(jax.value_and_grad(loss, has_aux=True))

    def run(momenta, batch):
        with exp.context():
            (value, (metrics, aux)), grads = grad_fn(state.params, jnp.asarray(momenta),
                                                     sharding.host_to_global(batch, exp.mesh))
        return float(value), jax.device_get(aux), jax.device_get(grads)

    return exp, run, jax.device_get(state.params)


@pytest.fixture(scope="module")
def single():
    exp, run, params = _step_fn((1, 1, 1), 1)
    return exp, run, params, make_batch(exp.objective.tokenizer)


MOMENTA = np.array([0.2, 0.0, 0.0], np.float32)  # near the batch means: both gate states occur


def test_loss_is_two_gated_infonce_terms(single):
    exp, run, params, batch = single
    loss, aux, _ = run(MOMENTA, batch)
    obj = exp.objective
    out, cap = jax.jit(lambda p, b: (obj.model.apply({"params": p}, b["image"], b["text_noisy"]),
                                     obj.encode_text(p, b["text_synthetic"])))(params, batch)
    img, raw, scale = np.asarray(out["image_emb"]), np.asarray(out["text_emb"]), float(out["logit_scale"])
    cap = np.asarray(cap)
    sample, pair_raw, pair_cap, want_momenta = np_gates(img, raw, cap, MOMENTA, 0.01)
    assert 0 < np.sum(sample == 1) < 16
    want = np_weighted_loss(img, raw, scale, sample * pair_raw) + np_weighted_loss(img, cap, scale, sample * pair_cap)
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    np.testing.assert_allclose(aux["momenta"], want_momenta, rtol=1e-5, atol=1e-7)
    # Running means far below every cosine open every gate: all weights 1, two plain InfoNCE terms (CLIP on each
    # caption).
    ungated, _, _ = run(np.full(3, -5.0, np.float32), batch)
    plain = float(softmax_contrastive_loss(img, raw, scale)[0] + softmax_contrastive_loss(img, cap, scale)[0])
    np.testing.assert_allclose(ungated, plain, rtol=1e-5)


def test_sharded_step_equals_single_device(single):
    _, run1, params, batch = single
    loss1, aux1, grads1 = run1(MOMENTA, batch)
    _, run8, _ = _step_fn((2, 4, 1), -1, params)
    loss8, aux8, grads8 = run8(MOMENTA, batch)
    assert abs(loss8 - loss1) <= 1e-5 * abs(loss1)
    np.testing.assert_allclose(aux8["momenta"], aux1["momenta"], rtol=1e-5)
    total = np.sqrt(sum(np.sum(np.square(g)) for g in jax.tree.leaves(grads1)))
    assert total > 0
    for (path, g1), g8 in zip(jax.tree_util.tree_leaves_with_path(grads1), jax.tree.leaves(grads8)):
        diff = np.linalg.norm(np.asarray(g8) - np.asarray(g1))
        # Relative per leaf; leaves whose gradient is ~0 (e.g. key biases) are measured against the global norm.
        assert diff <= 1e-5 * max(np.linalg.norm(g1), 1e-3 * total), (jax.tree_util.keystr(path), diff)


def test_config_errors_name_the_bad_value():
    with pytest.raises(ValueError, match="loss.variant='ring'"):
        build_experiment(alip_config(**{"loss.variant": "ring"}))
    with pytest.raises(ValueError, match="alip.momentum_rate=0.0"):
        build_experiment(alip_config(**{"alip.momentum_rate": 0.0}))


def test_cluster_variant_builds():
    config = vlp_config.load_config_file(str(REPO / "configs" / "alip.py") + ":B/16")
    exp = build_experiment(config)  # abstract shapes and shardings only: nothing is allocated
    assert sum(x.size for x in jax.tree.leaves(exp.abstract_state.params)) > 1.2e8
    assert exp.abstract_state.extra["momenta"].shape == (3,)
