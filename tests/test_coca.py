"""CoCa: its sanity values (methods.md section 9), the decoder's causality and padding invariance, each loss term
against numpy, the reduction to CLIP, and one sharded step (mesh 2x4x1) equal to one device."""

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO

from vlp import config as vlp_config
from vlp.losses.captioning import caption_loss
from vlp.models.coca import Captioner
from vlp.objectives.clip import ClipObjective
from vlp.objectives.two_tower import TwoTowerObjective
from vlp.parallel import sharding
from vlp.train.trainer import build_experiment

CAPTIONS = ["a large red circle in the upper left", "blue square", "small green triangle right", "a star",
            "a small yellow star in the lower right", "red", "circle top left img", "a large blue square",
            "green circle", "a small red square in the lower left", "triangle blue bottom", "yellow",
            "a large green star in the upper right", "purple circle img", "square", "a small blue triangle"]


def coca_config(**updates):
    config = vlp_config.load_config_file(str(REPO / "configs" / "coca.py") + ":tiny")
    config.model.image.update(width=32, depth=1, mlp_dim=64, num_heads=2)
    config.model.text.update(width=32, depth=1, mlp_dim=64, num_heads=2)
    config.model.embed_dim = 32
    config.coca.update(gen_queries=4, pooler_heads=2, multimodal_depth=1)
    # lucidrains's logit scale init e^1 (methods.md): at vlp's 1/0.07 the spread of random 32-d cosines (std ~0.18)
    # alone adds ~1.3 nats to ln B at these tiny widths.
    config.model.logit_scale_init = float(np.e)
    config.batch_size = 16
    config.mesh.num_devices = 1
    vlp_config.apply_overrides(config, {k: str(v) for k, v in updates.items()})
    return config


def make_batch(tokenizer, n=16, max_len=12):
    rng = np.random.RandomState(0)
    return {"image": rng.randn(n, 32, 32, 3).astype(np.float32), "text": tokenizer.encode(CAPTIONS[:n], max_len),
            "label": np.zeros((n,), np.int32)}


@pytest.fixture(scope="module")
def setup():
    exp = build_experiment(coca_config())
    with exp.context():
        params = exp.init_state().params
    return exp, jax.device_get(params), make_batch(exp.objective.tokenizer)


def np_infonce(img, txt, scale):
    logits = scale * img @ txt.T
    lse_r = np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + logits.max(1)
    lse_c = np.log(np.exp(logits - logits.max(0, keepdims=True)).sum(0)) + logits.max(0)
    diag = np.diag(logits)
    return 0.5 * (np.mean(lse_r - diag) + np.mean(lse_c - diag))


def np_caption_ce(logits, targets, pad=0):
    logits = logits.astype(np.float64)
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    nll = lse - np.take_along_axis(logits, targets[..., None], -1)[..., 0]
    w = targets != pad
    return (nll * w).sum() / w.sum()


@pytest.fixture(scope="module")
def loss_and_metrics(setup):
    exp, params, batch = setup
    with exp.context():
        return jax.jit(exp.objective.loss_fn)(params, batch, jax.random.key(0))


def test_initial_losses_are_log_vocab_and_log_batch(setup, loss_and_metrics):
    exp, _, _ = setup
    _, metrics = loss_and_metrics
    vocab = exp.objective.tokenizer.vocab_size
    assert abs(float(metrics["loss_caption"]) - np.log(vocab)) < 0.05  # 5.95 for the 384-piece shapes tokenizer
    assert abs(float(metrics["loss_contrastive"]) - np.log(16)) < 0.2


def test_each_loss_term_matches_numpy(setup, loss_and_metrics):
    exp, params, batch = setup
    loss, metrics = loss_and_metrics
    out = jax.device_get(jax.jit(exp.objective.apply)(params, batch["image"], batch["text"]))
    con = np_infonce(out["image_emb"].astype(np.float64), out["text_emb"].astype(np.float64), float(out["logit_scale"]))
    cap = np_caption_ce(out["logits"], batch["text"])
    np.testing.assert_allclose(float(metrics["loss_contrastive"]), con, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["loss_caption"]), cap, rtol=1e-5)
    np.testing.assert_allclose(float(loss), 1.0 * con + 2.0 * cap, rtol=1e-5)  # w_con 1, w_cap 2 (methods.md)


def test_caption_loss_ignores_padding_against_numpy():
    rng = np.random.RandomState(1)
    logits = rng.randn(3, 5, 7).astype(np.float32) * 3
    targets = np.array([[4, 2, 6, 0, 0], [1, 6, 0, 0, 0], [3, 3, 3, 3, 6]])
    loss, metrics = caption_loss(jnp.asarray(logits), jnp.asarray(targets), pad_id=0)
    np.testing.assert_allclose(float(loss), np_caption_ce(logits, targets), rtol=1e-6)
    logits_changed = logits.copy()
    logits_changed[targets == 0] = 100.0  # predictions at padded targets do not count
    np.testing.assert_allclose(float(caption_loss(logits_changed, targets)[0]), float(loss), rtol=1e-6)
    accuracy = ((logits.argmax(-1) == targets) & (targets != 0)).sum() / (targets != 0).sum()
    np.testing.assert_allclose(float(metrics["caption_token_accuracy"]), accuracy, rtol=1e-6)


def test_changing_token_leaves_earlier_logits_unchanged(setup):
    exp, params, batch = setup
    t = 3
    text = batch["text"][:4]
    changed = text.copy()
    changed[:, t + 1] = (changed[:, t + 1] + 7) % (exp.objective.tokenizer.vocab_size - 1) + 1
    logits = jax.jit(lambda p, x: exp.objective.apply(p, batch["image"][:4], x, method=Captioner.__call__)["logits"])
    a, b = np.asarray(logits(params, text)), np.asarray(logits(params, changed))
    # Position p predicts token p from tokens < p: token t+1 is first read at position t+2.
    np.testing.assert_allclose(a[:, :t + 2], b[:, :t + 2], atol=1e-6)
    assert np.abs(a[:, t + 2] - b[:, t + 2]).max() > 1e-3


def test_padding_does_not_change_the_text_embedding(setup):
    exp, params, _ = setup
    tok = exp.objective.tokenizer
    short = tok.encode(CAPTIONS[:4], 10)
    long = tok.encode(CAPTIONS[:4], 12)  # the same captions with two more pads
    encode = jax.jit(exp.objective.encode_text)
    np.testing.assert_allclose(np.asarray(encode(params, short)), np.asarray(encode(params, long)), atol=1e-6)
    other = long.copy()
    other[:, 0] = (other[:, 0] + 1) % (tok.vocab_size - 1) + 1  # a real token does change it
    assert np.abs(np.asarray(encode(params, other)) - np.asarray(encode(params, long))).max() > 1e-4


def test_no_multimodal_layers_and_no_caption_weight_is_clip():
    exp = build_experiment(coca_config(**{"coca.multimodal_depth": 0, "coca.caption_weight": 0.0}))
    batch = make_batch(exp.objective.tokenizer)
    with exp.context():
        params = exp.init_state().params
        loss, _ = jax.jit(exp.objective.loss_fn)(params, batch, jax.random.key(0))
        emb = jax.jit(lambda p, b: {"image_emb": exp.objective.encode_image(p, b["image"]),
                                    "text_emb": exp.objective.encode_text(p, b["text"]),
                                    "logit_scale": exp.objective.apply(p, method=Captioner.logit_scale),
                                    "logit_bias": jnp.zeros(())})(params, batch)
        clip = SimpleNamespace(loss_kind=ClipObjective.loss_kind, config=exp.config)
        clip_loss, _ = TwoTowerObjective.loss_from_embeddings(clip, emb)  # CLIP's loss on these towers
    assert "multi_0" not in params["decoder"]
    np.testing.assert_allclose(float(loss), float(clip_loss), rtol=1e-6)
    expected = np_infonce(*(np.asarray(emb[k], np.float64) for k in ("image_emb", "text_emb")),
                          float(emb["logit_scale"]))
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)


def _loss_and_grads(mesh_shape, num_devices, batch, params=None):
    exp = build_experiment(coca_config(**{"mesh.shape": str(mesh_shape), "mesh.num_devices": num_devices}))
    with exp.context():
        state = exp.init_state()
        if params is not None:
            state = state.replace(params=jax.device_put(params, exp.state_shardings.params))
        global_batch = sharding.host_to_global(batch, exp.mesh)
        fn = jax.jit(jax.value_and_grad(lambda p, b: exp.objective.loss_fn(p, b, jax.random.key(0))[0]))
        compiled = fn.lower(state.params, global_batch).compile()  # compiled once: run it and read its HLO
        loss, grads = compiled(state.params, global_batch)
        hlo = compiled.as_text()
    return float(loss), jax.device_get(grads), jax.device_get(state.params), hlo


def test_sharded_step_equals_single_device(setup):
    exp, _, batch = setup
    loss1, grads1, params, _ = _loss_and_grads((1, 1, 1), 1, batch)
    loss8, grads8, _, hlo = _loss_and_grads((2, 4, 1), -1, batch, params)
    assert abs(loss8 - loss1) <= 1e-5 * abs(loss1)
    total = np.sqrt(sum(np.sum(np.square(g)) for g in jax.tree.leaves(grads1)))
    for path, g1 in jax.tree_util.tree_leaves_with_path(grads1):
        g8 = _at(grads8, path)
        diff = np.linalg.norm(g8 - g1)
        # Relative per leaf; leaves whose gradient is ~0 (e.g. key biases) are measured against the global norm.
        assert diff <= 1e-5 * max(np.linalg.norm(g1), 1e-3 * total), (jax.tree_util.keystr(path), diff)
    assert "all-gather" in hlo


def _at(tree, path):
    for key in path:
        tree = tree[key.key]
    return np.asarray(tree)


@pytest.mark.parametrize("spec,minimum", [("coca.py:B/16", 2e8), ("cappa.py:B/16", 1.3e8)])
def test_cluster_variants_build(spec, minimum):
    config = vlp_config.load_config_file(str(REPO / "configs" / spec))
    exp = build_experiment(config)  # abstract shapes and shardings only: nothing is allocated
    count = sum(x.size for x in jax.tree.leaves(exp.abstract_state.params))
    assert count > minimum, (spec, count)


def test_caption_scores_against_hand_counts():
    from vlp.eval.captioning import caption_scores

    refs = [["a large red circle in the upper left"], ["a small blue square in the lower right"]]
    perfect = caption_scores(["A large red circle in the upper left.", "a small blue square in the lower right"], refs)
    assert perfect["exact_match"] == 1.0 and abs(perfect["bleu4"] - 1.0) < 1e-6
    half = caption_scores(["a large red circle in the upper left", "a small blue square"], refs)
    assert half["exact_match"] == 0.5
    # Corpus BLEU-4: every n-gram of the prediction is correct, so it is the brevity penalty of 12 predicted
    # against 16 reference tokens.
    np.testing.assert_allclose(half["bleu4"], np.exp(1 - 16 / 12), rtol=1e-5)
    assert half["cider"] < perfect["cider"]


def test_remat_of_the_decoder_blocks_gives_equal_gradients():
    from vlp.models.decoder import TextDecoder
    from vlp.objectives.coca import CocaObjective

    # model.remat_policy reaches the decoder ...
    assert CocaObjective(coca_config(**{"model.remat_policy": "full"})).model.decoder["remat_policy"] == "full"
    # ... whose blocks (the open_clip layout has all three kinds) then recompute with equal gradients.
    kwargs = dict(vocab_size=20, max_len=6, width=16, num_heads=2, mlp_dim=32, n_uni=1, n_multi=1, embed_cls=True,
                  layout="open_clip", bos_id=1)
    rng = np.random.RandomState(0)
    tokens = jnp.asarray(rng.randint(1, 20, (2, 6)))
    context = jnp.asarray(rng.randn(2, 3, 16), jnp.float32)
    weights = jnp.asarray(rng.randn(2, 6, 20), jnp.float32)
    params = sharding.strip_boxes(jax.jit(TextDecoder(**kwargs).init)(jax.random.key(0), tokens, context)["params"])
    grads = []
    for policy in ("none", "full"):
        model = TextDecoder(**kwargs, remat_policy=policy)

        def loss(p, model=model):
            cls, logits = model.apply({"params": p}, tokens, context)
            return jnp.sum(logits * weights) + jnp.sum(cls)

        fn = jax.grad(loss)
        # One checkpointed call per block: uni_0, multi_0, cross_0.
        assert str(jax.make_jaxpr(fn)(params)).count("remat2[") == (0 if policy == "none" else 3)
        grads.append(jax.device_get(jax.jit(fn)(params)))
    for path, g in jax.tree_util.tree_leaves_with_path(grads[0]):
        np.testing.assert_allclose(_at(grads[1], path), g, rtol=1e-5, atol=1e-7, err_msg=jax.tree_util.keystr(path))
