"""FLIP patch dropout (`model.image.patch_dropout`): exactly round((1-p) N) distinct patches kept per example, drawn
from (seed, step, row in the global batch) so 1 device and 2x4x1 train the same step and a resumed run draws the same
patches; none at evaluation; an optional final unmasked phase from `model.image.patch_dropout_until_step`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, tiny_config

from vlp import config as vlp_config
from vlp.models.vit import ViT, num_kept_patches, patch_dropout_keep
from vlp.objectives import get_objective
from vlp.parallel import sharding
from vlp.train import accumulation
from vlp.train.trainer import build_experiment, make_train_step, step_grad_fn

DROPOUT = {"model.image.patch_dropout": "0.5"}  # tiny_config: 32 px / patch 8 = 16 patches, 8 kept


def rel_diff(a, b):
    a = np.concatenate([np.ravel(x) for x in jax.tree.leaves(jax.device_get(a))])
    b = np.concatenate([np.ravel(x) for x in jax.tree.leaves(jax.device_get(b))])
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    return {"image": rng.normal(size=(16, 32, 32, 3)).astype(np.float32),
            "text": rng.integers(1, 300, size=(16, 12)).astype(np.int32),
            "label": np.zeros((16,), np.int32)}


def test_kept_count_is_round_of_the_kept_share():
    assert num_kept_patches(196, 0.5) == 98
    assert num_kept_patches(196, 0.75) == 49
    assert num_kept_patches(64, 0.75) == 16
    assert num_kept_patches(16, 0.0) == 16
    assert num_kept_patches(4, 0.99) == 1  # never an empty image
    with pytest.raises(ValueError, match=r"patch dropout 1.0 must be in \[0, 1\)"):
        num_kept_patches(16, 1.0)


def test_kept_patches_are_distinct_and_differ_per_example_and_step():
    step_key = lambda step: jax.random.fold_in(jax.random.key(0), step)  # noqa: E731  (the trainer's rng)
    keep = np.asarray(patch_dropout_keep(step_key(3), 64, 49, 12))
    assert keep.shape == (64, 12) and keep.dtype == np.int32
    for row in keep:
        assert len(set(row.tolist())) == 12 and row.min() >= 0 and row.max() < 49  # a subset, no duplicates
    assert len({tuple(row) for row in keep}) == 64  # every example its own draw
    again = np.asarray(patch_dropout_keep(step_key(3), 64, 49, 12))
    np.testing.assert_array_equal(keep, again)  # a function of (seed, step): a resumed step draws the same
    assert (np.asarray(patch_dropout_keep(step_key(4), 64, 49, 12)) != keep).any()
    # Uniform: every patch is kept about K/N = 12/49 of the time over many examples.
    share = np.bincount(np.asarray(patch_dropout_keep(step_key(5), 4096, 49, 12)).ravel(), minlength=49) / 4096
    np.testing.assert_allclose(share, 12 / 49, atol=0.03)
    # Example i's draw does not depend on the batch around it (accumulation, any sharding): row i of a bigger batch.
    np.testing.assert_array_equal(np.asarray(patch_dropout_keep(step_key(3), 8, 49, 12)), keep[:8])


@pytest.fixture(scope="module")
def dropped():
    """The tiny CLIP experiment with patch dropout 0.5 and an unmasked phase from step 4, and its initial params."""
    exp = build_experiment(tiny_config(**DROPOUT, **{"model.image.patch_dropout_until_step": "4"}))
    return exp, jax.device_get(exp.init_state().params)


def loss_of(exp, params, batch, rng, patch_dropout):
    """The objective's loss on `batch` with the step inputs drawn from `rng` (what the train step differentiates)."""
    objective = exp.objective
    with exp.context():
        return float(jax.jit(lambda p, b: objective.loss_fn(p, objective.add_step_inputs(b, rng, patch_dropout),
                                                           rng)[0])(params, batch))


@pytest.fixture(scope="module")
def losses(dropped, batch):
    """Losses of the same params and step rng: with patch dropout, in the unmasked phase, and without dropout."""
    exp, params = dropped
    rng = jax.random.key(3)
    plain = build_experiment(tiny_config())
    return {"rng": rng, "dropout": loss_of(exp, params, batch, rng, True),
            "unmasked": loss_of(exp, params, batch, rng, False), "plain": loss_of(plain, params, batch, rng, True)}


def test_vit_sees_only_the_kept_patches(dropped, batch):
    exp, params = dropped
    inputs = exp.objective.add_step_inputs({k: jnp.asarray(v) for k, v in batch.items()}, jax.random.key(1), True)
    assert inputs["patch_keep"].shape == (16, 8)
    image_params = {"params": params["image"]}
    apply = jax.jit(ViT(**exp.objective.model.image).apply)
    _, tokens = apply(image_params, inputs["image"], keep=inputs["patch_keep"])
    assert tokens.shape == (16, 1 + 8, 32)
    # Keeping every patch in a shuffled order gives the full model's CLS output (attention is permutation-invariant)
    # only if each token kept its own position embedding: the gather comes after the position embedding.
    everything = np.stack([np.random.default_rng(i).permutation(16) for i in range(16)]).astype(np.int32)
    pooled_all, _ = apply(image_params, inputs["image"], keep=jnp.asarray(everything))
    pooled_full, _ = apply(image_params, inputs["image"])
    np.testing.assert_allclose(pooled_all, pooled_full, rtol=1e-5, atol=1e-5)


def test_no_dropout_at_evaluation(dropped, losses, batch):
    exp, params = dropped
    images = jnp.asarray(batch["image"])
    # The evaluation encoder is the plain model: the ViT on every patch, whatever training drops.
    reference, _ = ViT(**exp.objective.model.image).apply({"params": params["image"]}, images)
    with_projection = np.asarray(reference) @ np.asarray(params["image_proj"]["kernel"])
    expected = with_projection / np.linalg.norm(with_projection, axis=-1, keepdims=True)
    np.testing.assert_allclose(exp.objective.encode_image(params, images), expected, rtol=1e-5, atol=1e-6)
    assert abs(losses["dropout"] - losses["plain"]) > 1e-4  # training really drops patches
    assert losses["unmasked"] == pytest.approx(losses["plain"], rel=1e-6)  # the unmasked phase is the plain model


def test_unmasked_phase_starts_at_patch_dropout_until_step(dropped, losses, batch):
    exp, params = dropped
    objective = exp.objective
    with exp.context():
        grads = jax.jit(step_grad_fn(objective, jax.value_and_grad(objective.loss_fn, has_aux=True)))
        for step, expected in [(0, "dropout"), (3, "dropout"), (4, "unmasked"), (7, "unmasked")]:
            (loss, _), _ = grads(params, batch, losses["rng"], jnp.int32(step))
            assert float(loss) == pytest.approx(losses[expected], rel=1e-6), step


def test_the_train_step_draws_from_seed_and_step_only(dropped, batch):
    """Resume exactness: the patches a step drops are a function of (seed, step, row) - not of how the run got to
    that step - so a restarted run at step s trains exactly what the uninterrupted one did."""
    exp, _ = dropped
    state = exp.init_state()
    with exp.context():
        step = jax.jit(make_train_step(exp.objective, exp.optimizer, exp.schedule, exp.config.seed))
        first = {s: float(step(state.replace(step=jnp.int32(s)), batch)[1]["loss"]) for s in (2, 3)}
        assert float(step(state.replace(step=jnp.int32(2)), batch)[1]["loss"]) == first[2]
    assert first[2] != first[3]
    # ... and it is exactly the objective's loss on the patches drawn from fold_in(key(seed), step).
    rng = jax.random.fold_in(jax.random.key(exp.config.seed), 2)
    assert first[2] == pytest.approx(loss_of(exp, jax.device_get(state.params), batch, rng, True), rel=1e-6)


def step_grads(mesh_shape, num_devices, batch, initial_params=None, **overrides):
    config = tiny_config(**DROPOUT, **{"mesh.shape": str(mesh_shape), "mesh.num_devices": num_devices}, **overrides)
    exp = build_experiment(config)
    state = exp.init_state()
    if initial_params is not None:
        state = state.replace(params=jax.device_put(initial_params, exp.state_shardings.params))
    grad_fn = step_grad_fn(exp.objective, accumulation.make_grad_fn(exp.objective, config.accumulation.steps,
                                                                    config.accumulation.mode))
    rng = jax.random.fold_in(jax.random.key(config.seed), 7)
    with exp.context():
        global_batch = sharding.host_to_global(batch, exp.mesh)
        keep = jax.jit(lambda b: exp.objective.add_step_inputs(b, rng, True)["patch_keep"])(global_batch)
        (loss, _), grads = jax.jit(grad_fn)(state.params, global_batch, rng, jnp.int32(7))
    return {"initial": jax.device_get(state.params), "loss": float(loss), "grads": jax.device_get(grads),
            "keep": np.asarray(jax.device_get(keep))}


def test_sharded_step_with_patch_dropout_equals_single_device(batch):
    single = step_grads((1, 1, 1), 1, batch)
    sharded = step_grads((2, 4, 1), -1, batch, initial_params=single["initial"])
    np.testing.assert_array_equal(sharded["keep"], single["keep"])  # 8 devices draw what 1 device draws
    assert abs(sharded["loss"] - single["loss"]) / abs(single["loss"]) <= 1e-5
    single_leaves = jax.tree_util.tree_leaves_with_path(single["grads"])
    sharded_leaves = jax.tree.leaves(sharded["grads"])
    for (path, a), b in zip(single_leaves, sharded_leaves):
        if np.linalg.norm(a) > 0:
            assert rel_diff(b, a) <= 1e-5, jax.tree_util.keystr(path)
    # Gradient accumulation (GradCache) sees the very same patches: the draw is made on the global batch.
    accumulated = step_grads((1, 1, 1), 1, batch, initial_params=single["initial"], **{"accumulation.steps": "2"})
    assert abs(accumulated["loss"] - single["loss"]) / abs(single["loss"]) <= 1e-5
    assert rel_diff(accumulated["grads"], single["grads"]) <= 1e-4


def test_patch_dropout_is_refused_by_objectives_without_it():
    config = vlp_config.load_config_file(str(REPO / "configs" / "simmim.py") + ":tiny")
    vlp_config.apply_overrides(config, DROPOUT)
    with pytest.raises(ValueError, match=r"model.image.patch_dropout=0.5 is not supported by objective 'simmim'; "
                                         r"set it to 0.0"):
        get_objective("simmim")(config)
