"""XBT (vlp/objectives/xbt.py, vlp/losses/compatibility.py) and cross-model retrieval (vlp/eval/retrieval.py,
tools/eval.py --gallery_workdir): the loss against numpy; a step moves psi only (the new model and the old reference
stay bitwise equal); stage 1 sends no images and runs no image tower; a pairs step on 2x4x1 equals 1 device (loss
and every gradient leaf); cross-model recall of a model against itself is its own recall; with psi = identity and
old = new, the tool's cross figures equal both models' own figures."""

import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, tiny_config
from test_coca import _at
from test_eva import make_teacher

from vlp import config as vlp_config
from vlp.eval.retrieval import cross_model_recall, recall_at_k
from vlp.losses.compatibility import compatibility_loss
from vlp.parallel import mesh as mesh_lib
from vlp.parallel import sharding
from vlp.train import frozen, trainer
from vlp.train.checkpoint import Checkpointer

sys.path.insert(0, str(REPO / "tools"))
import eval as eval_tool  # noqa: E402


def np_log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def unit_rows(rng, n, d):
    x = rng.normal(size=(n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_compatibility_loss_matches_numpy():
    rng = np.random.default_rng(0)
    new, old = unit_rows(rng, 12, 6), unit_rows(rng, 12, 6)
    new[:6] += 0.5 * old[:6]  # some pairs agree more than others: a loss far from log(B)
    new /= np.linalg.norm(new, axis=1, keepdims=True)
    logits = 20.0 * new @ old.T
    infonce = -0.5 * (np.diag(np_log_softmax(logits)).mean() + np.diag(np_log_softmax(logits.T)).mean())
    cosine = np.mean(1.0 - (new * old).sum(1))
    got, metrics = compatibility_loss(new.astype(np.float32), old.astype(np.float32), 20.0, cosine_weight=0.5,
                                      mesh=mesh_lib.make_mesh((1, 1, 1), 1))
    np.testing.assert_allclose(float(got), infonce + 0.5 * cosine, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["loss_infonce"]), infonce, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["loss_cosine"]), cosine, rtol=1e-5)
    assert infonce > 0.1 and cosine > 0.1


def test_cross_model_recall_of_a_model_against_itself_is_its_own_recall():
    rng = np.random.default_rng(1)
    images, texts = unit_rows(rng, 40, 8), unit_rows(rng, 40, 8)
    texts[:20] = images[:20] + 0.3 * texts[:20]  # half the pairs findable: recall strictly between 0 and 1
    captions = [f"caption {i}" for i in range(40)]
    own = recall_at_k(images, texts, captions)
    assert 0.2 < own["i2t_r1"] < 0.9 and 0.2 < own["t2i_r1"] < 0.9
    assert cross_model_recall((images, texts), (images, texts), captions) == own
    # Another gallery model: the query images against ITS texts, its images against the query texts.
    other = (unit_rows(rng, 40, 8), texts)
    cross = cross_model_recall((images, texts), other, captions)
    assert cross["i2t_r1"] == own["i2t_r1"]  # the gallery's texts are the query model's
    assert cross["t2i_r1"] == recall_at_k(other[0], texts, captions)["t2i_r1"] != own["t2i_r1"]
    with pytest.raises(ValueError, match=r"not in one space"):
        cross_model_recall((images, texts), (images[:, :4], texts[:, :4]), captions)


# ---- the objective ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def models(tmp_path_factory) -> tuple[Path, Path]:
    """(old, new): two tiny CLIP workdirs with different params and embedding widths (16 and 32)."""
    root = tmp_path_factory.mktemp("xbt")
    return make_teacher(root / "old", seed=1, **{"model.embed_dim": 16}), make_teacher(root / "new")


def xbt_config(old: Path, new: Path, stage: str, **updates):
    return tiny_config(**{"objective": "xbt", "reference.path": str(old), "xbt.new.path": str(new),
                          "xbt.stage": stage, "optim.lr": 1e-2, "optim.warmup_steps": 0, **updates})


def started(config):
    """(experiment, TrainState with both frozen models read from disk as a run's first start reads them)."""
    exp = trainer.build_experiment(config)
    with exp.context():
        state = exp.init_state()
        state = state.replace(extra=exp.objective.initial_extra(state.params, exp.state_shardings.extra))
        state = frozen.attach_reference(exp.objective.reference, state, exp.state_shardings.extra, resumed=False)
    return exp, state


def loss_and_grads(exp, state, batch):
    with exp.context():
        fn = jax.jit(jax.value_and_grad(lambda p, e, b: exp.objective.loss_fn_with_extra(
            p, e, b, jax.random.key(0), jnp.int32(0))[0]))
        loss, grads = fn(state.params, state.extra, sharding.host_to_global(batch, exp.mesh))
    return float(loss), jax.device_get(grads)


@pytest.fixture(scope="module")
def text_stage(models):
    config = xbt_config(*models, "text")
    exp, state = started(config)
    batch = next(trainer.make_train_iterator(config, exp.objective))
    return exp, state, batch


def test_a_step_moves_psi_only(text_stage, models):
    exp, state, batch = text_stage
    assert list(state.params) == ["psi"]  # the optimizer sees psi alone
    before = jax.device_get((state.params, state.extra))
    on_disk = frozen.restore_params(models[1], jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state.extra["new"]))[1]
    with exp.context():
        state_after, metrics = trainer.jit_train_step(exp)(
            jax.tree.map(jnp.copy, state), sharding.host_to_global(batch, exp.mesh))
    (params, extra) = jax.device_get((state_after.params, state_after.extra))
    assert float(metrics["loss"]) > 0.5
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        assert np.abs(leaf - _at(before[0], path)).max() > 1e-5, jax.tree_util.keystr(path)  # every psi leaf moved
    for key in ("new", frozen.REFERENCE_KEY):
        for path, leaf in jax.tree_util.tree_leaves_with_path(extra[key]):
            np.testing.assert_array_equal(leaf, _at(before[1][key], path), err_msg=f"{key}{jax.tree_util.keystr(path)}")
    for path, leaf in jax.tree_util.tree_leaves_with_path(jax.device_get(on_disk)):
        np.testing.assert_array_equal(_at(extra["new"], path), leaf)  # and the new model is the one on disk


def test_stage_one_sends_no_images_and_runs_no_image_tower(text_stage):
    exp, state, batch = text_stage
    assert batch["image"].shape == (16, 1, 1, 3)  # DropImage: a 1x1 stand-in per example, no pixels
    loss, _ = loss_and_grads(exp, state, batch)
    poisoned, _ = loss_and_grads(exp, state, dict(batch, image=np.full_like(batch["image"], np.nan)))
    assert np.isfinite(loss) and loss == poisoned


def test_pairs_step_on_2x4x1_equals_one_device(models):
    config = xbt_config(*models, "pairs")
    exp1, state1 = started(config)
    batch = next(trainer.make_train_iterator(config, exp1.objective))
    assert batch["image"].shape == (16, 32, 32, 3)
    loss1, grads1 = loss_and_grads(exp1, state1, batch)
    exp8, state8 = started(xbt_config(*models, "pairs", **{"mesh.shape": "(2, 4, 1)", "mesh.num_devices": -1}))
    with exp8.context():  # the same psi on both
        state8 = state8.replace(params=jax.device_put(jax.device_get(state1.params), exp8.state_shardings.params))
    loss8, grads8 = loss_and_grads(exp8, state8, batch)
    assert loss1 > 0.5 and abs(loss8 - loss1) <= 1e-5 * abs(loss1)
    for path, g1 in jax.tree_util.tree_leaves_with_path(grads1):
        assert np.linalg.norm(g1) > 0
        diff = np.linalg.norm(_at(grads8, path) - g1)
        assert diff <= 1e-5 * np.linalg.norm(g1), (jax.tree_util.keystr(path), diff)


def test_identity_psi_with_old_equal_to_new_gives_the_models_own_figures(models, tmp_path):
    """tools/eval.py --gallery_workdir on an XBT run whose psi is the identity and whose old model is its new one:
    the cross figures equal the model's own, both ways."""
    _, new = models
    config = xbt_config(new, new, "pairs", **{"xbt.projection": "linear", "evals.retrieval.num_examples": 48})
    exp, state = started(config)
    eye = {"psi": {"fc": {"kernel": np.eye(32, dtype=np.float32), "bias": np.zeros(32, np.float32)}}}
    with exp.context():
        state = state.replace(params=jax.device_put(eye, exp.state_shardings.params))
    workdir = tmp_path / "xbt_identity"
    workdir.mkdir()
    (workdir / "config.json").write_text(vlp_config.to_json(config))
    checkpointer = Checkpointer(workdir / "checkpoints", max_to_keep=1, async_save=False)
    checkpointer.save(1, frozen.without_reference(state), None, force=True)
    checkpointer.close()
    record = eval_tool.main([f"--workdir={workdir}", f"--gallery_workdir={new}", f"--out={tmp_path / 'x.json'}"])
    assert json.loads((tmp_path / "x.json").read_text()) == record
    for key in ("i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5"):
        assert record[f"retrieval_cross_{key}"] == record[f"retrieval_{key}"] == record[f"gallery_retrieval_{key}"]
    assert 0.0 < record["retrieval_cross_t2i_r1"] < 1.0  # a figure that could differ


def test_config_errors_name_the_value(models):
    old, new = models
    with pytest.raises(ValueError, match=r"needs the new model: set xbt.new.path"):
        trainer.build_experiment(tiny_config(**{"objective": "xbt", "reference.path": str(old)}))
    with pytest.raises(ValueError, match=r"xbt.stage='images'; valid: \('text', 'pairs'\)"):
        trainer.build_experiment(xbt_config(old, new, "images"))


@pytest.mark.parametrize("variant,stage,batch", [("tiny_text", "text", 128), ("tiny", "pairs", 128),
                                                 ("B/16_text", "text", 1024), ("B/16", "pairs", 1024)])
def test_config_variants(variant, stage, batch):
    config = vlp_config.load_config_file(str(REPO / "configs" / "xbt.py") + ":" + variant)
    assert (config.objective, config.xbt.stage, config.batch_size) == ("xbt", stage, batch)
    with pytest.raises(ValueError, match=r"set xbt.new.path"):  # the models are the user's to name
        vlp_config.validate(config)
