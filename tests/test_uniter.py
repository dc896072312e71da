"""UNITER: the IPOT plan and WRA distance against a numpy transliteration of UNITER's `ot.py`, the sanity values of
methods.md section 11 (uniform marginals, D(w, v) < D(w, shuffled v), ITM ~ ln 2), MRFR and ITM against numpy,
conditional masking, the task mix, and one train step on a 2x4x1 mesh equal to one device."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, assert_same_update, assert_trees_close

from vlp import config as vlp_config
from vlp.data.pipeline import TrainStreamSpec, make_train_dataset
from vlp.data.sources import make_source
from vlp.data.transforms import SelectCaption, TokenizeBatch
from vlp.losses.fusion import itm_loss
from vlp.losses.ot import cosine_cost, ipot_plan, ot_distance, wra_loss
from vlp.models.uniter import Uniter
from vlp.objectives.uniter import TASKS, task_inputs
from vlp.parallel import sharding
from vlp.train.trainer import build_experiment


# --- optimal transport ------------------------------------------------------------------------------------------------
def np_ipot(cost, word_pad, region_pad, beta=0.5, iterations=50):
    """UNITER's `ipot` (uniter/model/ot.py) in numpy: cost [B, M, N], pads True -> plan [B, M, N]."""
    b, m, n = cost.shape
    x_len = (m - word_pad.sum(1)).astype(np.float64)
    y_len = (n - region_pad.sum(1)).astype(np.float64)
    joint_pad = (word_pad[:, :, None] | region_pad[:, None, :]).transpose(0, 2, 1)  # [B, N, M]
    sigma = np.ones((b, m)) / x_len[:, None]
    sigma[word_pad] = 0
    plan = np.ones((b, n, m))
    kernel = np.exp(-cost.transpose(0, 2, 1) / beta)
    plan[joint_pad], kernel[joint_pad] = 0, 0
    x_mask = (word_pad * 1e4)[:, None, :]
    y_mask = (region_pad * 1e4)[:, None, :]
    for _ in range(iterations):
        q = kernel * plan
        sigma = sigma.reshape(b, m, 1)
        delta = 1 / (y_len[:, None, None] * (q @ sigma).reshape(b, 1, n) + y_mask)
        sigma = 1 / (x_len[:, None, None] * (delta @ q) + x_mask)
        plan = delta.reshape(b, n, 1) * q * sigma
    plan[joint_pad] = 0
    return plan.transpose(0, 2, 1)


def np_cosine_cost(w, v, eps=1e-5):
    w = w / (np.linalg.norm(w, axis=-1, keepdims=True) + eps)
    v = v / (np.linalg.norm(v, axis=-1, keepdims=True) + eps)
    return 1 - np.einsum("bmd,bnd->bmn", w, v)


@pytest.fixture(scope="module")
def ot_case():
    rng = np.random.RandomState(0)
    words, regions = rng.randn(3, 6, 8), rng.randn(3, 5, 8)
    word_valid = np.arange(6)[None] < np.array([6, 4, 2])[:, None]
    region_valid = np.arange(5)[None] < np.array([5, 5, 3])[:, None]
    return words, regions, word_valid, region_valid


def test_ipot_plan_matches_numpy_and_has_uniform_marginals(ot_case):
    words, regions, word_valid, region_valid = ot_case
    cost = np.where(word_valid[:, :, None] & region_valid[:, None, :], np_cosine_cost(words, regions), 0.0)
    plan = np.asarray(jax.jit(ipot_plan)(jnp.asarray(cost, jnp.float32), jnp.asarray(word_valid),
                                         jnp.asarray(region_valid)))
    want = np_ipot(cost, ~word_valid, ~region_valid)
    np.testing.assert_allclose(plan, want, atol=1e-6)
    n_words, n_regions = word_valid.sum(1), region_valid.sum(1)
    # Words' marginals are exact (the last scaling); regions' converge (IPOT, k = 1): measured max error 3.8e-4
    # (0.19% of 1/5) after 50 iterations on this random cost.
    np.testing.assert_allclose(plan.sum(2), np.where(word_valid, 1 / n_words[:, None], 0), atol=1e-6)
    np.testing.assert_allclose(plan.sum(1), np.where(region_valid, 1 / n_regions[:, None], 0), atol=1e-3)
    assert plan[~(word_valid[:, :, None] & region_valid[:, None, :])].max() == 0.0


def test_ot_distance_matches_numpy_and_flows_through_the_cost_only(ot_case):
    words, regions, word_valid, region_valid = ot_case
    args = [jnp.asarray(x, jnp.float32) for x in (words, regions)] + [jnp.asarray(word_valid),
                                                                      jnp.asarray(region_valid)]
    joint = word_valid[:, :, None] & region_valid[:, None, :]
    cost = np.where(joint, np_cosine_cost(words, regions), 0.0)
    plan = np_ipot(cost, ~word_valid, ~region_valid)
    np.testing.assert_allclose(np.asarray(jax.jit(ot_distance)(*args)), (cost * plan).sum((1, 2)), rtol=1e-5)
    # The gradient is that of tr(C^T T) with T a constant (no gradient through the plan).
    grad = jax.jit(jax.grad(lambda w: ot_distance(w, *args[1:]).sum()))(args[0])
    fixed = jax.jit(jax.grad(lambda w: (jnp.where(joint, cosine_cost(w, args[1]), 0.0) * plan).sum()))(args[0])
    np.testing.assert_allclose(np.asarray(grad), np.asarray(fixed), atol=1e-6)


def test_aligned_regions_are_closer_than_shuffled_ones():
    rng = np.random.RandomState(1)
    words = rng.randn(8, 7, 16)
    regions = words[:, rng.permutation(7)] + 0.1 * rng.randn(8, 7, 16)  # the same features, in another order
    shuffled = np.roll(regions, 1, axis=0)  # the regions of another example
    valid = jnp.ones((8, 7), bool)
    distance = jax.jit(ot_distance)
    aligned = np.asarray(distance(jnp.asarray(words), jnp.asarray(regions), valid, valid))
    other = np.asarray(distance(jnp.asarray(words), jnp.asarray(shuffled), valid, valid))
    assert aligned.max() < 0.05 and other.min() > 0.5, (aligned, other)  # measured ~0.01 vs ~1.0


def test_wra_loss_against_numpy():
    distance = np.array([0.2, 0.9, 0.4, 1.3, 0.7])
    positive = np.array([True, False, True, False, False])
    want = (distance[positive].sum() - distance[~positive].sum()) / len(distance)
    np.testing.assert_allclose(float(wra_loss(jnp.asarray(distance), jnp.asarray(positive))), want, rtol=1e-6)


# --- the objective --------------------------------------------------------------------------------------------------
def uniter_config(**updates):
    config = vlp_config.load_config_file(str(REPO / "configs" / "uniter.py") + ":tiny")
    config.model.text.update(width=32, depth=1, mlp_dim=64, num_heads=2)
    config.batch_size = 16
    config.total_steps = 8
    config.optim.warmup_steps = 0  # the first step has the full learning rate
    config.mesh.num_devices = 1
    vlp_config.apply_overrides(config, {k: str(v) for k, v in updates.items()})
    return config


@pytest.fixture(scope="module")
def setup():
    exp = build_experiment(uniter_config())
    obj = exp.objective
    ds = make_train_dataset(make_source("shapes", "train", 32), obj.train_example_transform(SelectCaption("both", 0)),
                            TokenizeBatch(obj.tokenizer, exp.config.data.max_text_len), TrainStreamSpec(16, seed=0))
    batch = next(iter(ds))
    batch.pop("skipped_records", None)
    with exp.context():
        params = jax.device_get(exp.init_state().params)
    return exp, params, batch


def task_rngs(objective, seed: int = 0) -> dict[str, jax.Array]:
    """For each task, the rng of the first train step (fold_in(key(seed), step)) that draws it; step 0's task first."""
    draws = np.asarray(jax.jit(jax.vmap(lambda i: objective.sample_task(jax.random.fold_in(jax.random.key(seed), i))))(
        jnp.arange(64)))
    return {TASKS[t]: jax.random.fold_in(jax.random.key(seed), int(np.argmax(draws == t))) for t in range(3)}


@pytest.fixture(scope="module")
def task_outputs(setup):
    """Every task's (loss, metrics) and gradients on the batch at the rng of a step that draws it, on one device,
    by calling the task directly (one compile)."""
    exp, params, batch = setup
    rngs = task_rngs(exp.objective)
    fn = jax.jit(lambda p, b, r: {t: jax.value_and_grad(lambda q: exp.objective.task_loss(t, q, b, r[t]),
                                                        has_aux=True)(p) for t in TASKS})
    with exp.context():
        return jax.device_get(fn(params, batch, rngs)), rngs
def test_conditional_masking_never_masks_both_modalities(setup):
    _, _, batch = setup
    text_masked_rows = (batch["mlm_text"] != batch["text"]).any(1)
    assert text_masked_rows.sum() >= 4 and batch["mim_mask"].any(1).all()  # the batch holds both kinds of mask
    masked = {}
    for task in TASKS:
        text, region_mask = task_inputs(task, batch)
        text_masked = (np.asarray(text) != batch["text"]).any(1)
        image_masked = np.zeros(16, bool) if region_mask is None else np.asarray(region_mask).any(1)
        assert not (text_masked & image_masked).any(), task
        masked[task] = (text_masked.sum(), image_masked.sum())
    assert masked == {"itm": (0, 0), "mlm": (text_masked_rows.sum(), 0), "mrfr": (0, 16)}


def test_itm_loss_is_log2_at_uniform_outputs_and_matches_numpy(setup, task_outputs):
    exp, params, batch = setup
    obj = exp.objective
    outputs, rngs = task_outputs
    (loss, metrics), _ = outputs["itm"]
    assert abs(float(metrics["loss_itm"]) - np.log(2)) < 0.1  # random init: near-uniform outputs
    # The same inputs through the model: CE against the labels of the drawn negatives, then exactly ln 2 when the
    # head outputs are uniform.
    from vlp.objectives.uniter import random_negatives

    neg, partner = jax.device_get(random_negatives(jax.random.fold_in(rngs["itm"], 1), 16, 0.5))
    assert 3 <= neg.sum() <= 13 and (partner != np.arange(16)).all()
    text = np.where(neg[:, None], batch["text"][partner], batch["text"])
    out = jax.device_get(jax.jit(obj.apply)(params, text, obj.patches(batch["image"])))
    logits = out["itm_logits"].astype(np.float64)
    logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    np.testing.assert_allclose(float(metrics["loss_itm"]), -logp[np.arange(16), (~neg).astype(int)].mean(), rtol=1e-5)
    uniform, _ = itm_loss(jnp.zeros((16, 2)), jnp.asarray((~neg).astype(np.int32)))  # uniform outputs
    np.testing.assert_allclose(float(uniform), np.log(2), rtol=1e-6)
    np.testing.assert_allclose(float(loss), float(metrics["loss_itm"]) + 0.1 * float(metrics["loss_wra"]), rtol=1e-6)


def test_mrfr_loss_against_numpy(setup, task_outputs):
    exp, params, batch = setup
    obj = exp.objective
    (loss, _), _ = task_outputs[0]["mrfr"]
    patches = np.asarray(obj.patches(batch["image"]), np.float64)
    mask = batch["mim_mask"]

    def pred_fn(p):
        out = obj.apply(p, batch["text"], obj.patches(batch["image"]), mask)
        return obj.apply(p, out["regions"], method=Uniter.mrfr_features)

    pred = np.asarray(jax.jit(pred_fn)(params), np.float64)
    target = (patches - patches.mean(-1, keepdims=True)) / np.sqrt(patches.var(-1, ddof=1, keepdims=True) + 1e-6)
    want = ((pred - target) ** 2).mean(-1)[mask].mean()
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    assert 0.5 < want < 3.0  # standardised targets: ~1 plus the random head's output variance (measured 1.7)


def test_tasks_follow_the_mix_ratios(setup):
    obj = setup[0].objective
    draws = np.asarray(jax.jit(jax.vmap(lambda i: obj.sample_task(jax.random.fold_in(jax.random.key(0), i))))(
        jnp.arange(4000)))
    np.testing.assert_allclose(np.bincount(draws, minlength=3) / 4000, [0.4, 0.4, 0.2], atol=0.03)  # 2:2:1


def test_sharded_switch_and_update_equal_each_task_on_one_device(setup, task_outputs):
    """On a 2x4x1 mesh, the loss (lax.switch over the tasks) at the rng of a step that draws each task gives that
    task's loss and every gradient leaf of the task called directly on one device, and AdamW at a non-zero learning
    rate makes the same update from them. (The trainer's step around loss_fn and the optimizer is the same for every
    objective and has its own sharding test; compiling it here again would double this test's time.)"""
    exp1, params, batch = setup
    outputs, rngs = task_outputs
    exp = build_experiment(uniter_config(**{"mesh.shape": "(2, 4, 1)", "mesh.num_devices": -1}))
    with exp.context():
        state = exp.init_state()
        state = state.replace(params=jax.device_put(params, exp.state_shardings.params))
        global_batch = sharding.host_to_global(batch, exp.mesh)
        grad_fn = jax.jit(jax.value_and_grad(exp.objective.loss_fn, has_aux=True))
        update_fn = jax.jit(exp.optimizer.update)
        sharded = {}
        for task in TASKS:
            (loss, metrics), grads = grad_fn(state.params, global_batch, rngs[task])
            updates, _ = update_fn(grads, state.opt_state, state.params)
            sharded[task] = jax.device_get((loss, metrics, grads, updates))
    lr = float(exp.schedule(0))
    update_single = jax.jit(exp1.optimizer.update)
    opt_state = exp1.optimizer.init(params)
    for task in TASKS:
        loss, metrics, grads, updates = sharded[task]
        (want_loss, _), want_grads = outputs[task]
        assert float(metrics[f"task_{task}"]) == 1.0
        np.testing.assert_allclose(float(loss), float(want_loss), rtol=1e-5)
        # The key bias (zero gradient in exact arithmetic) and the other tasks' heads (exactly zero) are measured
        # against a floor; every other leaf to rel 1e-5.
        assert_trees_close(grads, want_grads, rtol=1e-5, zero_floor=1e-3)
        want_updates, _ = update_single(want_grads, opt_state, params)
        new = jax.tree.map(lambda p, u: np.asarray(p) + np.asarray(u), params, updates)
        want = jax.tree.map(lambda p, u: np.asarray(p) + np.asarray(u), params, jax.device_get(want_updates))
        assert_same_update(new, want, params, lr, rtol=1e-4)


def test_cluster_variant_builds():
    exp = build_experiment(vlp_config.load_config_file(str(REPO / "configs" / "uniter.py") + ":B/16"))
    count = sum(x.size for x in jax.tree.leaves(exp.abstract_state.params))
    assert 8.5e7 < count < 9.5e7, count  # BERT-base's 12 x 7.1M layers + embeddings + heads
