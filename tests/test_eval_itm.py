"""ITM evaluators on hand-made encoders (no model): re-ranking the contrastive top-k by the ITM score, and ITM accuracy
on positive and negative pairs."""

import numpy as np
import pytest

from vlp.eval.common import Encoders
from vlp.eval.itm import ItmEvaluator, RetrievalItmEvaluator, rerank

CAPTIONS = ["red circle", "blue square", "green star", "yellow triangle", "purple circle", "red square"]
N = len(CAPTIONS)


def encoders(match_sign=1.0):
    """Image i is an array filled with i, caption j tokenises to [j]. Contrastively image i is closest to caption
    i + 1 and next to caption i (so contrastive R@1 = 0, R@5 = 1); the ITM head knows the true pairs."""
    angles = np.arange(N) * 2 * np.pi / N
    text = np.stack([np.cos(angles), np.sin(angles)], 1)
    image = np.stack([np.cos(angles + 0.8 * 2 * np.pi / N), np.sin(angles + 0.8 * 2 * np.pi / N)], 1)
    return Encoders(
        encode_image=lambda params, images: image[images[:, 0, 0, 0].astype(int)],
        encode_text=lambda params, tokens: text[tokens[:, 0]],
        tokenize=lambda texts: np.array([[CAPTIONS.index(t)] for t in texts]),
        itm_score=lambda params, images, tokens: match_sign * np.where(
            images[:, 0, 0, 0].astype(int) == tokens[:, 0], 1.0, -1.0))


IMAGES = np.broadcast_to(np.arange(N, dtype=np.float32)[:, None, None, None], (N, 2, 2, 3)).copy()


def test_rerank_orders_candidates_by_score():
    top = np.array([[4, 2, 7], [1, 0, 3]])
    np.testing.assert_array_equal(rerank(top, np.array([[0.1, 0.9, 0.5], [2.0, 2.0, 3.0]])), [[2, 7, 4], [3, 1, 0]])


def test_itm_reranking_fixes_the_contrastive_top1():
    results = RetrievalItmEvaluator(encoders(), IMAGES, CAPTIONS, k=16).run(None)
    assert results["retrieval_itm_contrastive_i2t_r1"] == 0.0 and results["retrieval_itm_contrastive_t2i_r1"] == 0.0
    assert results["retrieval_itm_i2t_r1"] == 1.0 and results["retrieval_itm_t2i_r1"] == 1.0
    # a head that prefers the wrong pairs pushes the true caption down among the candidates
    worse = RetrievalItmEvaluator(encoders(-1.0), IMAGES, CAPTIONS, k=16).run(None)
    assert worse["retrieval_itm_i2t_r1"] == 0.0 and worse["retrieval_itm_i2t_r5"] < 1.0


def test_itm_accuracy_on_positive_and_negative_pairs():
    good = ItmEvaluator(encoders(), IMAGES, CAPTIONS).run(None)
    assert good == {"itm_accuracy": 1.0, "itm_accuracy_pos": 1.0, "itm_accuracy_neg": 1.0}
    assert ItmEvaluator(encoders(-1.0), IMAGES, CAPTIONS).run(None)["itm_accuracy"] == 0.0


def test_itm_evaluators_need_an_itm_head():
    plain = Encoders(encode_image=None, encode_text=None, tokenize=lambda t: np.zeros((len(t), 1), int))
    with pytest.raises(ValueError, match="needs an objective with an ITM head"):
        ItmEvaluator(plain, IMAGES, CAPTIONS)
