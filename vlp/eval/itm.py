"""Evaluators of an image-text matching (ITM) head: ALBEF-style retrieval (candidates by the contrastive similarity,
re-ranked by the ITM score) and ITM accuracy on held-out positive and negative pairs.

Both read `Encoders.itm_score(params, images [P, H, W, 3], tokens [P, L]) -> [P]` (the matched-minus-unmatched
logit). Hits are scored by text as in vlp.eval.retrieval, so a caption repeated across images is not a miss.
"""

from __future__ import annotations

import numpy as np

from vlp.data import pipeline, sources
from vlp.eval.common import Encoders, Params, topk_indices
from vlp.eval.retrieval import KS, RetrievalEvaluator, recall_at_k


def _text_codes(captions: list[str], text_image: np.ndarray) -> tuple[np.ndarray, int, np.ndarray]:
    """(text id per caption, number of distinct texts, sorted codes image * num_texts + text id of the matches)."""
    _, text_ids = np.unique(np.asarray(captions, dtype=object).astype(str), return_inverse=True)
    num_texts = int(text_ids.max(initial=0)) + 1
    return text_ids, num_texts, np.unique(text_image.astype(np.int64) * num_texts + text_ids)


def rerank(top: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Candidates top [Q, k] (best first) reordered by scores [Q, k], best first (stable for ties)."""
    order = np.argsort(-scores, axis=1, kind="stable")
    return np.take_along_axis(top, order, axis=1)


class RetrievalItmEvaluator(RetrievalEvaluator):
    """`<name>_{i2t,t2i}_r{1,5,10}` after ITM re-ranking of the top `k` candidates by contrastive similarity, and
    the contrastive-only figures beside them as `<name>_contrastive_{i2t,t2i}_r{1,5,10}`."""

    def __init__(self, encoders: Encoders, images: np.ndarray, captions, name: str = "retrieval_itm", k: int = 16,
                 pairs_per_call: int = 256):
        super().__init__(encoders, images, captions, name=name)
        if encoders.itm_score is None:
            raise ValueError(f"evaluator {name!r} needs an objective with an ITM head (itm_scores), e.g. albef, tcl")
        if k < max(KS):
            raise ValueError(f"evals.{name}.k={k} must be >= {max(KS)} (the largest recall cut-off)")
        self.k, self.pairs_per_call = k, pairs_per_call

    @classmethod
    def build(cls, encoders: Encoders, *, name: str, data_source: str, split: str, image_size: int,
              num_examples: int, caption: str = "synthetic", k: int = 16, **unused) -> "RetrievalItmEvaluator":
        eval_set = pipeline.load_eval_set(sources.make_source(data_source, split, image_size), num_examples)
        if caption not in eval_set.captions:
            raise ValueError(f"evals.{name}.caption={caption!r}; valid: {sorted(eval_set.captions)}")
        return cls(encoders, eval_set.images, eval_set.captions[caption], name=name, k=k)

    def _pair_scores(self, params: Params, image_idx: np.ndarray, text_idx: np.ndarray) -> np.ndarray:
        out = []
        for start in range(0, len(image_idx), self.pairs_per_call):
            sl = slice(start, start + self.pairs_per_call)
            out.append(self.encoders.itm_score(params, self.images[image_idx[sl]], self.tokens[text_idx[sl]]))
        return np.concatenate(out)

    def run(self, params: Params) -> dict[str, float]:
        image_emb = self.encoders.encode_image(params, self.images)
        text_emb = self.encoders.encode_text(params, self.tokens)
        results = {f"{self.name}_contrastive_{k}": v
                   for k, v in recall_at_k(image_emb, text_emb, self.captions, self.text_image).items()}
        text_ids, num_texts, relevant = _text_codes(self.captions, self.text_image)
        k = min(self.k, len(text_emb), len(image_emb))
        top_t = topk_indices(image_emb @ text_emb.T, k)  # [N, k] texts per image
        rows = np.repeat(np.arange(len(image_emb)), k)
        top_t = rerank(top_t, self._pair_scores(params, rows, top_t.reshape(-1)).reshape(top_t.shape))
        i2t = np.isin(np.arange(len(image_emb))[:, None] * num_texts + text_ids[top_t], relevant)
        top_i = topk_indices(text_emb @ image_emb.T, k)  # [M, k] images per text
        cols = np.repeat(np.arange(len(text_emb)), k)
        top_i = rerank(top_i, self._pair_scores(params, top_i.reshape(-1), cols).reshape(top_i.shape))
        t2i = np.isin(top_i.astype(np.int64) * num_texts + text_ids[:, None], relevant)
        for cut in KS:
            results[f"{self.name}_i2t_r{cut}"] = float(i2t[:, :cut].any(axis=1).mean())
            results[f"{self.name}_t2i_r{cut}"] = float(t2i[:, :cut].any(axis=1).mean())
        return results


class ItmEvaluator:
    """`<name>_accuracy` (and `_accuracy_pos`, `_accuracy_neg`): the ITM head's decision (score > 0 = matched) on
    each held-out image with its own caption and with the caption of another image whose text differs (drawn
    with a fixed seed)."""

    def __init__(self, encoders: Encoders, images: np.ndarray, captions: list[str], name: str = "itm",
                 seed: int = 0):
        if encoders.itm_score is None:
            raise ValueError(f"evaluator {name!r} needs an objective with an ITM head (itm_scores), e.g. albef, tcl")
        captions = [str(c) for c in captions]
        if len(set(captions)) < 2:
            raise ValueError(f"evaluator {name!r} needs >= 2 distinct captions to make negative pairs")
        rng = np.random.default_rng(seed)
        negatives = np.empty(len(captions), np.int64)
        for i, caption in enumerate(captions):  # another image's caption, with a different text
            j = int(rng.integers(len(captions)))
            while captions[j] == caption:
                j = int(rng.integers(len(captions)))
            negatives[i] = j
        self.encoders, self.images, self.name = encoders, images, name
        self.tokens = encoders.tokenize(captions)
        self.negatives = negatives

    @classmethod
    def build(cls, encoders: Encoders, *, name: str, data_source: str, split: str, image_size: int,
              num_examples: int, caption: str = "synthetic", seed: int = 0, **unused) -> "ItmEvaluator":
        eval_set = pipeline.load_eval_set(sources.make_source(data_source, split, image_size), num_examples)
        if caption not in eval_set.captions or caption == "all":
            raise ValueError(f"evals.{name}.caption={caption!r}; valid: "
                             f"{sorted(k for k in eval_set.captions if k != 'all')}")
        return cls(encoders, eval_set.images, eval_set.captions[caption], name=name, seed=seed)

    def run(self, params: Params) -> dict[str, float]:
        pos = self.encoders.itm_score(params, self.images, self.tokens)
        neg = self.encoders.itm_score(params, self.images, self.tokens[self.negatives])
        return {f"{self.name}_accuracy": float(0.5 * ((pos > 0).mean() + (neg <= 0).mean())),
                f"{self.name}_accuracy_pos": float((pos > 0).mean()),
                f"{self.name}_accuracy_neg": float((neg <= 0).mean())}
