"""CapPa: parallel prediction (`cappa.masked_pred_prob`: the share of masked examples, drawn per step; masked rows
read no caption token) and its loss against numpy, and one sharded step (mesh 2x4x1) equal to one device."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, objective_loss_and_grads
from test_coca import CAPTIONS, _at, make_batch, np_caption_ce

from vlp import config as vlp_config
from vlp.train.trainer import build_experiment

PROB = 0.5


def cappa_config(**updates):
    config = vlp_config.load_config_file(str(REPO / "configs" / "cappa.py") + ":tiny")
    config.model.image.update(width=32, depth=1, mlp_dim=64, num_heads=2)
    config.model.text.update(width=32, depth=1, mlp_dim=64, num_heads=2)
    config.cappa.masked_pred_prob = PROB
    config.batch_size = 16
    config.mesh.num_devices = 1
    vlp_config.apply_overrides(config, {k: str(v) for k, v in updates.items()})
    return config


@pytest.fixture(scope="module")
def setup():
    exp = build_experiment(cappa_config())
    with exp.context():
        params = exp.init_state().params
    batch = make_batch(exp.objective.tokenizer)
    logits = jax.jit(lambda p, text, masked: exp.objective.apply(p, batch["image"], text, masked)["logits"])
    return exp, jax.device_get(params), batch, logits


def test_the_masked_share_matches_the_probability_and_is_drawn_per_step(setup):
    exp, _, _, _ = setup
    seed_key = jax.random.key(exp.config.seed)
    draws = np.stack([np.asarray(exp.objective.masked_rows(jax.random.fold_in(seed_key, step), 256))
                      for step in range(8)])
    # 2048 Bernoulli(0.5) draws: the share is within 4 standard deviations (0.044) of the probability.
    assert abs(draws.mean() - PROB) < 4 * np.sqrt(PROB * (1 - PROB) / draws.size), draws.mean()
    assert not (draws[0] == draws[1]).all()  # each step draws its own rows ...
    again = np.asarray(exp.objective.masked_rows(jax.random.fold_in(seed_key, 3), 256))
    np.testing.assert_array_equal(again, draws[3])  # ... and a resumed run draws the same ones
    assert exp.objective.masked_rows(seed_key, 256).dtype == jnp.bool_


def test_masked_rows_read_no_caption_token(setup):
    exp, params, batch, logits = setup
    masked = np.zeros(len(batch["text"]), bool)
    masked[::2] = True
    other = exp.objective.tokenizer.encode(CAPTIONS[::-1], batch["text"].shape[1])
    blank = np.zeros_like(batch["text"])  # all padding
    a, b, c = (np.asarray(logits(params, t, masked)) for t in (batch["text"], other, blank))
    # Masked rows: mask embeddings at every input, so the caption (or its absence) changes nothing.
    np.testing.assert_array_equal(a[masked], b[masked])
    np.testing.assert_array_equal(a[masked], c[masked])
    # Teacher-forced rows do read the caption.
    assert np.abs(a[~masked] - b[~masked]).max() > 1e-3
    # Every position of a masked row sees the whole (bidirectional) row: predictions differ by position only
    # through the position embedding, not through earlier tokens.
    assert np.abs(a[masked][:, 0] - a[masked][:, -1]).max() > 1e-4


def test_loss_with_probability_one_is_parallel_prediction_ce_against_numpy(setup):
    exp, params, batch, logits = setup
    objective = type(exp.objective)(cappa_config(**{"cappa.masked_pred_prob": 1.0}))
    loss, metrics = jax.jit(objective.loss_fn)(params, batch, jax.random.key(3))
    all_masked = np.ones(len(batch["text"]), bool)
    want = np_caption_ce(np.asarray(logits(params, batch["text"], all_masked)), batch["text"])
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    assert float(metrics["masked_share"]) == 1.0
    # and the loss's mask is masked_rows' draw: at PROB it reports the share that draw has
    _, metrics = jax.jit(exp.objective.loss_fn)(params, batch, jax.random.key(3))
    share = np.asarray(exp.objective.masked_rows(jax.random.key(3), len(batch["text"]))).mean()
    np.testing.assert_allclose(float(metrics["masked_share"]), share)


def _loss_and_grads(exp, batch, params):
    loss, _, grads, _ = objective_loss_and_grads(exp, batch, params)
    return loss, grads


def test_sharded_step_equals_single_device(setup):
    exp, params, batch, _ = setup
    assert 0 < np.asarray(exp.objective.masked_rows(jax.random.key(0), 16)).sum() < 16  # both kinds of rows
    loss1, grads1 = _loss_and_grads(exp, batch, params)
    loss8, grads8 = _loss_and_grads(build_experiment(cappa_config(**{"mesh.shape": "(2, 4, 1)",
                                                                     "mesh.num_devices": -1})), batch, params)
    assert abs(loss8 - loss1) <= 1e-5 * abs(loss1)
    total = np.sqrt(sum(np.sum(np.square(g)) for g in jax.tree.leaves(grads1)))
    for path, g1 in jax.tree_util.tree_leaves_with_path(grads1):
        diff = np.linalg.norm(_at(grads8, path) - g1)
        assert diff <= 1e-5 * max(np.linalg.norm(g1), 1e-3 * total), (jax.tree_util.keystr(path), diff)
    assert np.linalg.norm(grads1["decoder"]["mask_embed"]) > 0  # the parallel-prediction path has a gradient
