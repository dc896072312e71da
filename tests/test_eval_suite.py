"""The evaluation suite against independent plain-loop implementations and hand-known values: multi-caption
retrieval, zero-shot with bundled class names and templates, weighted kNN, the linear probe."""

import numpy as np
import pytest

from vlp.eval import prompts
from vlp.eval.knn import knn_predict
from vlp.eval.linear_probe import probe_accuracy
from vlp.eval.retrieval import recall_at_k
from vlp.eval.zero_shot import class_embeddings, class_prompt_lists, topk_accuracy


def unit(x):
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def loop_recall(image, text, captions, text_image, k):
    """Recall@k written the slow, obvious way: rank every candidate with sorted(), test relevance by text."""
    image_texts = [{captions[j] for j in range(len(captions)) if text_image[j] == i} for i in range(len(image))]
    i2t = []
    for i in range(len(image)):
        ranked = sorted(range(len(text)), key=lambda j: (-float(image[i] @ text[j]), j))[:k]
        i2t.append(any(captions[j] in image_texts[i] for j in ranked))
    t2i = []
    for j in range(len(text)):
        ranked = sorted(range(len(image)), key=lambda i: (-float(image[i] @ text[j]), i))[:k]
        t2i.append(any(captions[j] in image_texts[i] for i in ranked))
    return float(np.mean(i2t)), float(np.mean(t2i))


def test_multi_caption_recall_matches_a_loop_implementation():
    rng = np.random.default_rng(1)
    n, per_image = 40, 5  # COCO-style: five captions per image, a few texts repeated across images
    image = unit(rng.normal(size=(n, 16)))
    text_image = np.repeat(np.arange(n), per_image)
    text = unit(image[text_image] + 0.6 * rng.normal(size=(n * per_image, 16)))
    captions = [f"caption {j % 170}" for j in range(n * per_image)]  # ids 170..199 repeat texts of 0..29
    ours = recall_at_k(image, text, captions, text_image)
    for k in (1, 5, 10):
        i2t, t2i = loop_recall(image, text, captions, text_image, k)
        assert ours[f"i2t_r{k}"] == pytest.approx(i2t)
        assert ours[f"t2i_r{k}"] == pytest.approx(t2i)
    assert 0.2 < ours["i2t_r1"] < 1.0  # the noise level makes this a real ranking problem


def test_recall_is_one_for_perfect_embeddings_and_chance_when_shuffled():
    rng = np.random.default_rng(2)
    n = 500
    image = unit(rng.normal(size=(n, 64)))
    text_image = np.repeat(np.arange(n), 2)
    captions = [f"text {j}" for j in range(2 * n)]
    perfect = recall_at_k(image, image[text_image], captions, text_image)
    assert all(v == 1.0 for v in perfect.values())
    shuffled = recall_at_k(image, image[rng.permutation(text_image)], captions, text_image)
    # chance: i2t@10 ~ 1 - C(998, 10)/C(1000, 10) ~ 0.020; t2i@10 = 10/500 = 0.020
    assert shuffled["i2t_r10"] < 0.06 and shuffled["t2i_r10"] < 0.06


def test_zero_shot_matches_a_loop_implementation():
    rng = np.random.default_rng(3)
    counts = [3, 1, 4, 2]
    text = unit(rng.normal(size=(sum(counts), 8)))
    image = unit(rng.normal(size=(60, 8)))
    labels = rng.integers(0, 4, 60)
    classes = class_embeddings(text, counts)
    expected_classes, start = [], 0
    for c in counts:
        mean = [sum(text[start + p][d] for p in range(c)) / c for d in range(8)]
        norm = sum(v * v for v in mean) ** 0.5
        expected_classes.append([v / norm for v in mean])
        start += c
    np.testing.assert_allclose(classes, expected_classes, atol=1e-12)
    for k in (1, 2):
        hits = [labels[i] in sorted(range(4), key=lambda c: -float(image[i] @ classes[c]))[:k] for i in range(60)]
        assert topk_accuracy(image, classes, labels, k) == pytest.approx(np.mean(hits))


def test_bundled_class_names_and_templates():
    names = prompts.load_class_names("imagenet1k")
    assert len(names) == 1000 and names[0] == "tench" and names[-1] == "toilet paper"
    assert len(prompts.load_templates("clip80")) == 80 and len(prompts.load_templates("clip7")) == 7
    assert prompts.load_templates("siglip") == ["This is a photo of {}."]
    lists = class_prompt_lists("shapes", class_names="imagenet1k", templates="clip7")
    assert len(lists) == 1000 and lists[1][0] == "itap of a goldfish."
    # Without names or templates: shapes' own caption-style prompts, written out here for class 0 (red circle).
    own = class_prompt_lists("shapes")
    assert len(own) == 64 and all(len(p) == 16 for p in own)
    assert own[0] == [f"a {size} red circle in the {pos}" for size in ("small", "medium", "large")
                      for pos in ("upper left", "upper right", "lower left", "lower right")] + [
        "red circle", "circle red", "red circle photo", "img red circle"]
    assert own[0][0] == "a small red circle in the upper left" and own[9][-1] == "img orange square"
    bundled = r"neither a bundled set nor a file; valid: \['clip7', 'clip80', 'name', 'siglip'\]"
    with pytest.raises(ValueError, match=bundled):
        prompts.load_templates("clip81")


def test_templates_from_a_file_need_one_placeholder(tmp_path):
    good = tmp_path / "templates.txt"
    good.write_text("# comment\na photo of a {}.\n\n{} in the wild\n")
    assert prompts.load_templates(str(good)) == ["a photo of a {}.", "{} in the wild"]
    bad = tmp_path / "bad.txt"
    bad.write_text("a photo\n")
    with pytest.raises(ValueError, match="exactly one '{}'"):
        prompts.load_templates(str(bad))


def loop_knn(train_x, train_y, eval_x, k, num_classes, temperature):
    preds = []
    for q in eval_x:
        sims = [float(q @ t) / (np.linalg.norm(q) * np.linalg.norm(t)) for t in train_x]
        top = sorted(range(len(train_x)), key=lambda j: (-sims[j], j))[:k]
        votes = [0.0] * num_classes
        for j in top:
            votes[train_y[j]] += np.exp(sims[j] / temperature)
        preds.append(int(np.argmax(votes)))
    return np.asarray(preds)


def test_knn_matches_a_loop_implementation_and_separates_clusters():
    rng = np.random.default_rng(4)
    centres = rng.normal(size=(5, 16))
    train_y, eval_y = rng.integers(0, 5, 300), rng.integers(0, 5, 50)
    train_x = centres[train_y] + 1.2 * rng.normal(size=(300, 16))
    eval_x = centres[eval_y] + 1.2 * rng.normal(size=(50, 16))
    for k in (1, 10, 20):
        np.testing.assert_array_equal(knn_predict(train_x, train_y, eval_x, k, 5, 0.07),
                                      loop_knn(train_x, train_y, eval_x, k, 5, 0.07))
    clean = knn_predict(centres[train_y], train_y, centres[eval_y] + 1e-3, 10, 5)
    assert (clean == eval_y).all()


def test_linear_probe_separable_vs_shuffled_labels():
    rng = np.random.default_rng(5)
    centres = 3.0 * rng.normal(size=(8, 24))
    train_y, eval_y = rng.integers(0, 8, 800), rng.integers(0, 8, 200)
    train_x = (centres[train_y] + rng.normal(size=(800, 24))).astype(np.float32)
    eval_x = (centres[eval_y] + rng.normal(size=(200, 24))).astype(np.float32)
    result = probe_accuracy(train_x, train_y, eval_x, eval_y, 8, l2_sweep=(1e-4, 1e-2))
    assert result["top1"] >= 0.99 and result["top5"] == 1.0 and result["l2"] in (1e-4, 1e-2)
    shuffled = probe_accuracy(train_x, rng.permutation(train_y), eval_x, eval_y, 8, l2_sweep=(1e-4, 1e-2))
    assert shuffled["top1"] < 0.3  # chance is 1/8


def test_logistic_regression_reaches_the_optimum():
    # At the optimum of the convex objective its gradient (computed here in numpy) vanishes.
    import jax.numpy as jnp

    from vlp.eval.linear_probe import fit_logistic_regression

    rng = np.random.default_rng(6)
    x = rng.normal(size=(300, 10)).astype(np.float32)
    y = rng.integers(0, 3, 300)
    l2 = 1e-2
    w, b = (np.asarray(a, np.float64) for a in fit_logistic_regression(jnp.asarray(x), jnp.asarray(y),
                                                                         jnp.float32(l2), num_classes=3))
    logits = x @ w + b
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    residual = (p - np.eye(3)[y]) / len(x)
    grad_w, grad_b = x.T @ residual + l2 * w, residual.sum(axis=0)
    assert np.abs(grad_w).max() < 1e-5 and np.abs(grad_b).max() < 1e-5
    assert np.abs(w).max() > 0.05  # and it did move away from the zero start
