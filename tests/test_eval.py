"""Evaluators: recall@k scored by caption text, prompt-ensemble zero-shot, on hand-made embeddings."""

import numpy as np

from vlp.eval.common import Encoders
from vlp.eval.retrieval import RetrievalEvaluator, recall_at_k
from vlp.eval.zero_shot import ZeroShotEvaluator, class_embeddings, topk_accuracy


def unit(x):
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_recall_counts_a_retrieved_duplicate_caption_as_a_hit():
    captions = ["a", "b", "a", "c"]
    text = unit(np.eye(4))
    # image 0 is nearest caption 2 (same text "a": a hit); image 1 nearest caption 3 ("c" != "b": a miss at k=1,
    # its own caption is second); image 2 and 3 are nearest their own captions.
    image = unit([[0, 0, 1, 0.1], [0, 0.5, 0, 1], [0, 0, 1, 0], [0, 0, 0.2, 1]])
    r = recall_at_k(image, text, captions, ks=(1, 2))
    assert r["i2t_r1"] == 0.75
    assert r["i2t_r2"] == 1.0
    # caption queries: "a"(0) -> image 0 or 2 (image 2 is nearest, text "a": hit); "b"(1) -> image 1; "a"(2) ->
    # image 2; "c"(3) -> image 3 (score 1/|.|) vs image 1 (1/|.|): image 1 wins -> its caption "b" != "c", miss.
    t2i_top = np.argsort(-(image @ text.T).T, axis=1, kind="stable")[:, 0]
    expected = np.mean([captions[t2i_top[j]] == captions[j] for j in range(4)])
    assert r["t2i_r1"] == expected


def test_recall_with_distinct_captions_is_index_recall():
    rng = np.random.default_rng(0)
    image = unit(rng.normal(size=(50, 8)))
    text = unit(image + 0.3 * rng.normal(size=(50, 8)))
    captions = [f"caption {i}" for i in range(50)]
    r = recall_at_k(image, text, captions)
    scores = image @ text.T
    for k in (1, 5, 10):
        top = np.argsort(-scores, axis=1)[:, :k]
        assert r[f"i2t_r{k}"] == np.mean([i in top[i] for i in range(50)])
        top_t = np.argsort(-scores.T, axis=1)[:, :k]
        assert r[f"t2i_r{k}"] == np.mean([i in top_t[i] for i in range(50)])


def test_prompt_ensemble_averages_then_renormalises():
    prompts = unit([[1, 0], [0, 1], [1, 1]])
    classes = class_embeddings(prompts, [2, 1])
    np.testing.assert_allclose(classes, unit([[0.5, 0.5], [1, 1]]))


def test_topk_accuracy():
    class_emb = unit(np.eye(3))
    image = unit([[1, 0.5, 0], [0.2, 0.1, 1], [0.9, 1, 0]])
    labels = np.asarray([0, 2, 0])
    assert topk_accuracy(image, class_emb, labels, 1) == 2 / 3
    assert topk_accuracy(image, class_emb, labels, 2) == 1.0


def test_evaluators_run_on_encoders():
    # A fake "model": images and texts are embedded by a fixed lookup, so the expected numbers are known.
    table = {"red": [1, 0, 0], "blue": [0, 1, 0], "green": [0, 0, 1]}
    words = list(table)

    def tokenize(texts):
        return np.asarray([[words.index(t.split()[-1])] for t in texts], np.int32)

    encoders = Encoders(
        encode_image=lambda params, images: unit(images.reshape(len(images), -1)),
        encode_text=lambda params, tokens: unit(np.asarray([table[words[t[0]]] for t in tokens])),
        tokenize=tokenize,
    )
    images = np.asarray([[1, 0.1, 0], [0, 1, 0.2], [0.1, 0, 1], [0.9, 0, 0.1]], np.float32)
    zs = ZeroShotEvaluator(encoders, images, np.asarray([0, 1, 2, 2]),
                           [["a red"], ["a blue", "the blue"], ["a green"]]).run(None)
    assert zs == {"zeroshot_top1": 0.75, "zeroshot_top5": 1.0}
    rt = RetrievalEvaluator(encoders, images, ["a red", "a blue", "a green", "a red"]).run(None)
    assert rt["retrieval_i2t_r1"] == 1.0 and rt["retrieval_t2i_r1"] == 1.0
