"""Prompt learning (CoOp): only the context is trained, a context initialised to a hand-written prefix gives that
prompt's zero-shot logits exactly, the loss against numpy, and config errors."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, tiny_config

from vlp import config as vlp_config
from vlp.data import few_shot, shapes
from vlp.objectives.prompt import PromptObjective
from vlp.train import frozen

PREFIX = "a small"  # two pieces of the bundled shapes tokenizer


def prompt_config(**updates):
    config = vlp_config.load_config_file(str(REPO / "configs" / "prompt.py") + ":tiny")
    clip = tiny_config()  # the frozen CLIP: 32 wide, max_text_len 12
    config.reference.config = vlp_config.to_json(clip)
    config.prompt.update(num_context=2, context_init=PREFIX)
    config.data.max_text_len = 10
    config.data.mixture = ()
    config.mesh.num_devices = 1
    vlp_config.apply_overrides(config, {k: str(v) for k, v in updates.items()})
    return config


@pytest.fixture(scope="module")
def setup():
    obj = PromptObjective(prompt_config())
    params = nn.unbox(obj.init(jax.random.key(0)))
    # A CLIP with random weights, perturbed so that nothing is symmetric by accident.
    clip = nn.unbox(jax.jit(obj.clip.init)(jax.random.key(1)))
    rng = np.random.RandomState(0)
    images = rng.randn(12, 32, 32, 3).astype(np.float32)
    labels = rng.randint(0, 64, size=12).astype(np.int32)
    return obj, params, {frozen.REFERENCE_KEY: clip}, {"image": images, "text": np.zeros((12, 10), np.int32), "label": labels}


def test_context_initialised_to_a_prefix_gives_the_hand_written_logits(setup):
    obj, params, extra, _ = setup
    tok = obj.tokenizer
    names = list(shapes.CLASS_NAMES)
    # The prefix's pieces followed by each name's are the pieces of the whole prompt (so the comparison is exact).
    joint = tok.encode([f"{PREFIX} {n}" for n in names], 12)
    split = np.concatenate([tok.encode([PREFIX], 12)[:, :2].repeat(len(names), 0), tok.encode(names, 10)], axis=1)
    np.testing.assert_array_equal(joint, split)
    encode = jax.jit(obj.encode_text)
    learned = np.asarray(encode(obj.eval_params(params, extra), jnp.asarray(obj.class_tokens)))
    hand = np.asarray(jax.jit(obj.clip.encode_text)(extra[frozen.REFERENCE_KEY], jnp.asarray(joint)))
    np.testing.assert_allclose(learned, hand, atol=2e-6)
    # A context moved off the prefix is no longer that prompt (a random move: pre-LN towers ignore a constant shift).
    moved = {"context_delta": params["context_delta"] + jax.random.normal(jax.random.key(2), (2, 32))}
    other = np.asarray(encode(obj.eval_params(moved, extra), jnp.asarray(obj.class_tokens)))
    assert np.abs(other - hand).max() > 1e-2


def test_loss_matches_numpy(setup):
    obj, params, extra, batch = setup
    loss, (metrics, _) = jax.jit(obj.loss_fn_with_extra)(params, extra, batch, jax.random.key(0), jnp.int32(0))
    full = obj.eval_params(params, extra)
    img = np.asarray(jax.jit(obj.encode_image)(full, batch["image"]), np.float64)
    cls = np.asarray(jax.jit(obj.encode_text)(full, jnp.asarray(obj.class_tokens)), np.float64)
    scale = float(np.exp(np.asarray(extra[frozen.REFERENCE_KEY]["log_logit_scale"])))
    logits = scale * img @ cls.T
    lse = np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + logits.max(1)
    want = np.mean(lse - logits[np.arange(len(batch["label"])), batch["label"]])
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["train_top1"]), np.mean(logits.argmax(1) == batch["label"]))


def test_only_the_context_gets_gradients(setup):
    obj, params, extra, batch = setup
    assert list(params) == ["context_delta"] and params["context_delta"].shape == (2, 32)

    def loss(p, e):
        return obj.loss_fn_with_extra(p, e, batch, jax.random.key(0), jnp.int32(0))[0]

    value_and_grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    before, (g_params, g_extra) = value_and_grad(params, extra)
    assert float(jnp.linalg.norm(g_params["context_delta"])) > 1e-4
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(g_extra))  # the CLIP is frozen
    # One SGD step on the context lowers the loss (it does learn).
    stepped = {"context_delta": params["context_delta"] - 1.0 * g_params["context_delta"]}
    assert float(value_and_grad(stepped, extra)[0]) < float(before)


def test_config_errors():
    with pytest.raises(ValueError, match=r"prompt.context_init='a small' is 2 tokens but prompt.num_context=3"):
        PromptObjective(prompt_config(**{"prompt.num_context": 3, "data.max_text_len": 9}))
    with pytest.raises(ValueError, match=r"data.max_text_len=8 \+ prompt.num_context=2 must equal the frozen CLIP's "
                                         r"max_text_len 12"):
        PromptObjective(prompt_config(**{"data.max_text_len": 8}))


def test_few_shot_rows_are_the_first_shots_of_each_class():
    rows = few_shot.first_shots("train", 2)
    labels = [shapes.make_example("train", i, 16)["label"] for i in rows]
    assert sorted(labels) == sorted(list(range(64)) * 2)
    for i in range(max(rows)):  # no earlier example of a class was passed over
        if i not in rows:
            assert labels.count(shapes.make_example("train", i, 16)["label"]) == 2
