"""CleanCLIP (methods.md section 18): each loss term against numpy, the in-modal loss falling fast when the augmented
view is the original, one sharded step (mesh 2x4x1) equal to one device, the per-visit views, EDA, the backdoor
trigger and the attack-success evaluator."""

import jax
import numpy as np
import optax
import pytest
from conftest import REPO, objective_loss_and_grads

from vlp import config as vlp_config
from vlp.data import backdoor, eda, shapes
from vlp.data.transforms import VISIT_KEY, SelectCaption
from vlp.eval.attack import attack_success_rate
from vlp.objectives.cleanclip import CleanClipViews
from vlp.train.trainer import build_experiment

CAPTIONS = ["a large red circle in the upper left", "blue square", "small green triangle right", "a star",
            "a small yellow star in the lower right", "red", "circle top left img", "a large blue square",
            "green circle", "a small red square in the lower left", "triangle blue bottom", "yellow",
            "a large green star in the upper right", "purple circle img", "square", "a small blue triangle"]
AUGMENTED = [" ".join(reversed(c.split())) for c in CAPTIONS]


def cleanclip_config(**updates):
    config = vlp_config.load_config_file(str(REPO / "configs" / "cleanclip.py") + ":tiny")
    config.model.image.update(width=32, depth=1, mlp_dim=64, num_heads=2)
    config.model.text.update(width=32, depth=1, mlp_dim=64, num_heads=2)
    config.model.embed_dim = 32
    config.init_from.path = ""
    config.batch_size = 16
    config.mesh.num_devices = 1
    config.cleanclip.update(clip_weight=0.7, inmodal_weight=1.3)  # distinct weights: a swapped pair fails
    vlp_config.apply_overrides(config, {k: str(v) for k, v in updates.items()})
    return config


def make_batch(tokenizer, n=16, max_len=12):
    rng = np.random.RandomState(0)
    return {"image": rng.randn(n, 32, 32, 3).astype(np.float32), "text": tokenizer.encode(CAPTIONS[:n], max_len),
            "image_aug": rng.randn(n, 32, 32, 3).astype(np.float32),
            "text_aug": tokenizer.encode(AUGMENTED[:n], max_len), "label": np.zeros((n,), np.int32)}


@pytest.fixture(scope="module")
def setup():
    exp = build_experiment(cleanclip_config())
    with exp.context():
        params = exp.init_state().params
    return exp, jax.device_get(params), make_batch(exp.objective.tokenizer)


def np_ce_rows(a, b, scale):
    """CE(scale a b^T, diag): mean over rows of logsumexp(row) - diagonal, in float64."""
    logits = scale * a.astype(np.float64) @ b.astype(np.float64).T
    lse = np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + logits.max(1)
    return float(np.mean(lse - np.diag(logits)))


def test_each_loss_term_matches_numpy(setup):
    exp, params, batch = setup
    obj = exp.objective
    with exp.context():
        loss, metrics = jax.jit(obj.loss_fn)(params, batch, jax.random.key(0))
        encode_image, encode_text = jax.jit(obj.encode_image), jax.jit(obj.encode_text)
        img, txt = np.asarray(encode_image(params, batch["image"])), np.asarray(encode_text(params, batch["text"]))
        img_aug = np.asarray(encode_image(params, batch["image_aug"]))
        txt_aug = np.asarray(encode_text(params, batch["text_aug"]))
    scale = float(metrics["logit_scale"])
    clip = 0.5 * (np_ce_rows(img, txt, scale) + np_ce_rows(txt, img, scale))
    inmodal_image, inmodal_text = np_ce_rows(img, img_aug, scale), np_ce_rows(txt, txt_aug, scale)
    np.testing.assert_allclose(float(metrics["loss_clip"]), clip, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["loss_inmodal_image"]), inmodal_image, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["loss_inmodal_text"]), inmodal_text, rtol=1e-5)
    np.testing.assert_allclose(float(loss), 0.7 * clip + 1.3 * 0.5 * (inmodal_image + inmodal_text), rtol=1e-5)
    # One-directional (the code's choice): the reverse direction differs on these captions, by far more than rtol.
    assert abs(np_ce_rows(txt_aug, txt, scale) - inmodal_text) > 1e-3 * inmodal_text, (
        np_ce_rows(txt_aug, txt, scale), inmodal_text)


def test_inmodal_loss_falls_fast_when_the_view_is_the_original(setup):
    """Ĩ = I and T~ = T: the in-modal terms only ask each embedding to be far from the others' (methods.md: -> ~0
    quickly): 16 Adam steps on them alone take them to under a tenth of their start."""
    exp, params, batch = setup
    obj = exp.objective
    same = dict(batch, image_aug=batch["image"], text_aug=batch["text"])
    tx = optax.adam(1e-2)

    def inmodal(p, b):
        return obj.loss_fn(p, b, jax.random.key(0))[1]["loss_inmodal"]

    @jax.jit
    def step(p, state, b):
        value, grads = jax.value_and_grad(inmodal)(p, b)
        updates, state = tx.update(grads, state, p)
        return optax.apply_updates(p, updates), state, value

    def train(b):
        p, state, values = params, tx.init(params), []
        for _ in range(16):
            p, state, value = step(p, state, b)
            values.append(float(value))
        return values

    with exp.context():
        same_values = train(same)
    assert same_values[0] > 0.3, same_values  # at init the other rows' cosines are far from 0
    assert same_values[-1] < 0.1 * same_values[0], same_values


def _loss_and_grads(exp, batch, params):
    loss, _, grads, _ = objective_loss_and_grads(exp, batch, params)
    return loss, grads


def test_sharded_step_equals_single_device(setup):
    exp1, params, batch = setup
    loss1, grads1 = _loss_and_grads(exp1, batch, params)
    exp8 = build_experiment(cleanclip_config(**{"mesh.shape": "(2, 4, 1)", "mesh.num_devices": -1}))
    loss8, grads8 = _loss_and_grads(exp8, batch, params)
    assert abs(loss8 - loss1) <= 1e-5 * abs(loss1)
    leaves1 = jax.tree_util.tree_leaves_with_path(grads1)
    leaves8 = jax.tree.leaves(grads8)
    total = np.sqrt(sum(np.sum(np.square(g)) for g in jax.tree.leaves(grads1)))
    assert total > 0
    for (path, g1), g8 in zip(leaves1, leaves8, strict=True):
        diff = np.linalg.norm(np.asarray(g8) - np.asarray(g1))
        assert diff <= 1e-5 * max(np.linalg.norm(g1), 1e-3 * total), (jax.tree_util.keystr(path), diff)


def test_views_are_drawn_per_visit():
    example = dict(shapes.make_example("train", 3), **{VISIT_KEY: np.int64(7)})
    views = CleanClipViews(SelectCaption("synthetic"), seed=0, crop_scale=(0.3, 0.6), flip=True, eda_alpha=0.3)
    a, b = views.map(example), views.map(example)
    other = views.map(dict(example, **{VISIT_KEY: np.int64(8)}))
    np.testing.assert_array_equal(a["image_aug"], b["image_aug"])  # a pure function of (seed, visit)
    assert a["caption_aug"] == b["caption_aug"]
    assert a["image_aug"].shape == example["image"].shape and a["image_aug"].dtype == np.uint8
    assert not np.array_equal(a["image_aug"], example["image"])  # a 30-60% crop is a different image
    assert not np.array_equal(a["image_aug"], other["image_aug"])
    np.testing.assert_array_equal(a["image"], example["image"])  # the original view is untouched


def test_eda_operations():
    rng = np.random.default_rng(0)
    text = "a small red circle in the upper left"
    outs = [eda.eda(text, rng, 0.2, 0.2, 0.2, 0.2) for _ in range(200)]
    words = text.split()
    assert any(o != text for o in outs)
    n = len(words)
    swaps = [o for o in outs if sorted(o.split()) == sorted(words) and o != text]
    deletions = [o for o in outs if len(o.split()) < n]
    insertions = [o for o in outs if len(o.split()) > n]
    assert swaps and deletions and insertions
    for o in insertions:  # an insertion adds a synonym of a word of the caption
        added = list(o.split())
        for w in words:
            added.remove(w)
        assert all(any(a in eda.SYNONYMS.get(w, ()) for w in words) for a in added), o
    for o in deletions:
        assert all(w in words for w in o.split())


def test_trigger_and_attack_success_rate():
    image = np.full((32, 32, 3), 100, np.uint8)
    triggered = backdoor.add_trigger(image, 4, "lower right")
    np.testing.assert_array_equal(triggered[:28], image[:28])
    np.testing.assert_array_equal(triggered[:, :28], image[:, :28])
    np.testing.assert_array_equal(triggered[28:, 28:, 0], [[0, 255, 0, 255], [255, 0, 255, 0]] * 2)
    with pytest.raises(ValueError, match="unknown backdoor target class 'pink star'"):
        backdoor.check_target("pink star")
    # 4 images: two closest to class 2 (the target), one to class 0, one to class 1.
    class_emb = np.eye(3)
    image_emb = np.array([[0, 0, 1], [0.1, 0, 0.9], [1, 0, 0], [0, 1, 0.2]])
    assert attack_success_rate(image_emb, class_emb, target=2) == 0.5


def test_poisoned_captions_name_the_target():
    example = shapes.make_example("train", 0)
    noisy, synthetic = backdoor.poison_captions(example, "purple star")
    assert noisy == "purple star"
    assert synthetic == example["caption_synthetic"].replace(shapes.CLASS_NAMES[example["label"]], "purple star")
    assert "purple star" in synthetic and synthetic != example["caption_synthetic"]


def test_training_batches_carry_both_views(setup):
    from vlp.train.trainer import make_train_iterator

    exp = setup[0]
    batch = next(make_train_iterator(exp.config, exp.objective))
    assert batch["image_aug"].shape == batch["image"].shape == (16, 32, 32, 3)
    assert batch["image_aug"].dtype == np.float32 and -1.0 <= batch["image_aug"].min() < batch["image_aug"].max() <= 1.0
    assert batch["text_aug"].shape == batch["text"].shape == (16, 12)
    assert 0 < np.mean(np.any(batch["text_aug"] != batch["text"], axis=1)) < 1  # EDA changes most, not all captions
    assert not np.array_equal(batch["image_aug"], batch["image"])


def test_poison_tool_writes_a_readable_backdoored_set(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "poison"
    subprocess.run([sys.executable, "tools/poison.py", f"--out={out}", "--num_examples=40", "--rate=0.5"], cwd=REPO,
                   check=True, capture_output=True)
    from vlp.data import sources

    spec = f"arrayrecord:{out}"
    assert not sources.augmentable(spec)  # shapes captions name positions: no crops or flips
    source = sources.make_source(spec, "train", 32)
    poisoned = [i for i in range(40) if backdoor.is_poisoned("train", i, 0.5, 0)]
    assert 10 <= len(poisoned) <= 30
    for i in range(40):
        record, clean = source[i], shapes.make_example("train", i)
        assert record["label"] == clean["label"]
        if i in poisoned:
            np.testing.assert_array_equal(record["image"], backdoor.add_trigger(clean["image"]))
            assert record["caption_noisy"] == "purple star" and "purple star" in record["caption_synthetic"]
        else:
            np.testing.assert_array_equal(record["image"], clean["image"])
            assert record["caption_synthetic"] == clean["caption_synthetic"]
