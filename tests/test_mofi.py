"""MOFI: the multi-label entity loss and the joint loss against numpy, the entity labels of shapes records, and a
step on 2x4x1 equal to one device."""

import jax
import numpy as np
import pytest
from conftest import REPO

from vlp import config as vlp_config
from vlp.data import shapes
from vlp.data.entities import ENTITIES_KEY, AddEntities, entity_names
from vlp.data.transforms import SelectCaption
from vlp.losses.entity import multilabel_softmax_loss
from vlp.parallel import sharding
from vlp.train.trainer import build_experiment


def np_multilabel_ce(logits, entities):
    logits = np.asarray(logits, np.float64)
    log_probs = logits - logits.max(1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(1, keepdims=True))
    return np.mean([-np.mean([log_probs[b, e] for e in row if e >= 0]) for b, row in enumerate(entities)])


def np_infonce(img, txt, scale):
    logits = scale * np.asarray(img, np.float64) @ np.asarray(txt, np.float64).T
    lse_r = np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + logits.max(1)
    lse_c = np.log(np.exp(logits - logits.max(0, keepdims=True)).sum(0)) + logits.max(0)
    diag = np.diag(logits)
    return 0.5 * (np.mean(lse_r - diag) + np.mean(lse_c - diag))


def test_multilabel_loss_matches_numpy_and_one_entity_is_softmax_ce():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 16)).astype(np.float32) * 3
    entities = np.array([[0, 9], [3, -1], [15, 1], [2, 2 + 8], [7, -1], [5, 12]], np.int32)
    loss, metrics = jax.jit(multilabel_softmax_loss)(logits, entities)
    np.testing.assert_allclose(float(loss), np_multilabel_ce(logits, entities), rtol=1e-6)
    hits = [logits[b].argmax() in [e for e in row if e >= 0] for b, row in enumerate(entities)]
    np.testing.assert_allclose(float(metrics["entity_top1"]), np.mean(hits))
    single = jax.jit(multilabel_softmax_loss)(logits, entities[:, :1])[0]
    ce = -np.mean(jax.nn.log_softmax(logits)[np.arange(6), entities[:, 0]])
    np.testing.assert_allclose(float(single), ce, rtol=1e-6)


def test_shapes_attribute_entities_are_colour_and_shape_and_name_the_text():
    names = entity_names("shapes_attributes", ())
    transform = AddEntities(SelectCaption("noisy"), "shapes_attributes", names, 2)
    for index in range(5):
        example = shapes.make_example("train", index)
        out = transform.map(example)
        colour, shape = shapes.CLASS_NAMES[example["label"]].split(" ")
        assert [names[i] for i in out[ENTITIES_KEY]] == [colour, shape]
        assert out["caption"] == shapes.CLASS_NAMES[example["label"]] and out[ENTITIES_KEY][1] >= 8


def mofi_config(**updates):
    config = vlp_config.load_config_file(str(REPO / "configs" / "mofi.py") + ":tiny")
    config.model.image.update(width=32, depth=1, mlp_dim=64, num_heads=2)
    config.model.text.update(width=32, depth=1, mlp_dim=64, num_heads=2)
    config.model.embed_dim = 32
    config.model.logit_scale_init = float(np.e)
    config.batch_size = 16
    config.mesh.num_devices = 1
    vlp_config.apply_overrides(config, {k: str(v) for k, v in updates.items()})
    return config


def make_batch(exp, n=16):
    examples = [shapes.make_example("train", i) for i in range(n)]
    transform = AddEntities(SelectCaption("noisy"), "shapes_attributes", exp.objective.entity_names, 2)
    rows = [transform.map(e) for e in examples]
    rng = np.random.RandomState(0)
    return {"image": rng.randn(n, 32, 32, 3).astype(np.float32),
            "text": exp.objective.tokenizer.encode([r["caption"] for r in rows], exp.config.data.max_text_len),
            "label": np.array([e["label"] for e in examples], np.int32),
            ENTITIES_KEY: np.stack([r[ENTITIES_KEY] for r in rows])}


def _loss_and_grads(mesh_shape, num_devices, params=None):
    exp = build_experiment(mofi_config(**{"mesh.shape": str(mesh_shape), "mesh.num_devices": num_devices}))
    batch = make_batch(exp)
    with exp.context():
        state = exp.init_state()
        if params is not None:
            state = state.replace(params=jax.device_put(params, exp.state_shardings.params))
        global_batch = sharding.host_to_global(batch, exp.mesh)
        fn = jax.jit(jax.value_and_grad(lambda p, b: exp.objective.loss_fn(p, b, jax.random.key(0)), has_aux=True))
        (loss, metrics), grads = fn(state.params, global_batch)
        emb = jax.jit(exp.objective.embed)(state.params, global_batch)
    return exp, batch, float(loss), jax.device_get((metrics, grads, state.params, emb))


@pytest.fixture(scope="module")
def single_device():
    return _loss_and_grads((1, 1, 1), 1)


def test_joint_loss_matches_numpy(single_device):
    _, batch, loss, (metrics, _, params, emb) = single_device
    logits = np.asarray(emb["image_emb"], np.float64) @ np.asarray(params["entity_head"]["kernel"], np.float64)
    ent = np_multilabel_ce(logits, batch[ENTITIES_KEY])
    con = np_infonce(emb["image_emb"], emb["text_emb"], float(emb["logit_scale"]))
    np.testing.assert_allclose(float(metrics["loss_entity"]), ent, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["loss_contrastive"]), con, rtol=1e-5)
    np.testing.assert_allclose(loss, con + ent, rtol=1e-5)  # weights 1 and 1
    assert abs(ent - np.log(16)) < 0.5  # ~ln E at init


def test_sharded_step_equals_single_device(single_device):
    _, _, loss1, (_, grads1, params, _) = single_device
    _, _, loss8, (_, grads8, _, _) = _loss_and_grads((2, 4, 1), -1, params)
    assert abs(loss8 - loss1) <= 1e-5 * abs(loss1)
    total = np.sqrt(sum(np.sum(np.square(g)) for g in jax.tree.leaves(grads1)))
    flat8 = dict(jax.tree_util.tree_leaves_with_path(grads8))
    for path, g1 in jax.tree_util.tree_leaves_with_path(grads1):
        diff = np.linalg.norm(np.asarray(flat8[path]) - g1)
        assert diff <= 1e-5 * max(np.linalg.norm(g1), 1e-3 * total), (jax.tree_util.keystr(path), diff)


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match="mofi.entities='colours'; valid"):
        vlp_config.validate(mofi_config(**{"mofi.entities": "colours"}))
    with pytest.raises(ValueError, match="accumulation.mode='plain'"):
        vlp_config.validate(mofi_config(**{"accumulation.steps": 2}))
