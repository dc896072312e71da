"""Zero-shot over three modalities: the candidate of one modality (a 1-D signal) that best fits the others.

For each example i the score of candidate k is t * MIP(image_i, text_i, candidate_k) (`scoring="mip"`, Symile's
zero-shot) or the sum of pairwise dot products (`scoring="pairwise"`, the pairwise-CLIP baseline's). Needs a source
whose records carry `signal_label` and that lists its candidates (`source.signal_candidates()`: shapes:xor).
"""

from __future__ import annotations

import numpy as np

from vlp.data import pipeline, sources
from vlp.eval.common import Encoders, Params

SCORINGS = ("mip", "pairwise")


def candidate_scores(image_emb: np.ndarray, text_emb: np.ndarray, candidate_emb: np.ndarray,
                     scoring: str) -> np.ndarray:
    """image_emb, text_emb [N, D], candidate_emb [K, D] -> scores [N, K]."""
    if scoring == "mip":
        return (image_emb * text_emb) @ candidate_emb.T
    if scoring == "pairwise":
        return (image_emb + text_emb) @ candidate_emb.T + np.sum(image_emb * text_emb, axis=1, keepdims=True)
    raise ValueError(f"unknown scoring {scoring!r}; valid: {SCORINGS}")


class SignalZeroShotEvaluator:
    """Yields `<name>_top1`: how often the true signal class is the best-scoring candidate given image and text."""

    def __init__(self, encoders: Encoders, images: np.ndarray, tokens: np.ndarray, labels: np.ndarray,
                 candidates: np.ndarray, scoring: str = "mip", name: str = "signal_zeroshot"):
        if scoring not in SCORINGS:
            raise ValueError(f"evals.{name}.scoring={scoring!r}; valid: {SCORINGS}")
        if encoders.encode_signal is None:
            raise ValueError(f"evaluator {name!r} needs a model with a signal tower (objective symile)")
        self.encoders, self.images, self.tokens, self.labels = encoders, images, tokens, labels
        self.candidates, self.scoring, self.name = candidates, scoring, name

    @classmethod
    def build(cls, encoders: Encoders, *, name: str, data_source: str, split: str, image_size: int,
              num_examples: int, scoring: str = "mip", **unused) -> "SignalZeroShotEvaluator":
        """The first `num_examples` records of `split` (their main caption as the text) against every candidate."""
        source = sources.make_source(data_source, split, image_size)
        if not hasattr(source, "signal_candidates"):
            raise ValueError(f"evaluator {name!r}: data source {data_source!r} lists no signal candidates; use "
                             "'shapes:xor'")
        num_examples = pipeline.eval_set_size(source, num_examples, name)
        records = [source[i] for i in range(num_examples)]
        eval_set = pipeline.load_eval_set(source, num_examples)
        tokens = encoders.tokenize([r["caption_noisy"] for r in records])
        labels = np.asarray([r["signal_label"] for r in records], np.int32)
        return cls(encoders, eval_set.images, tokens, labels, source.signal_candidates(), scoring, name)

    def run(self, params: Params) -> dict[str, float]:
        image_emb = self.encoders.encode_image(params, self.images)
        text_emb = self.encoders.encode_text(params, self.tokens)
        candidate_emb = self.encoders.encode_signal(params, self.candidates)
        scores = candidate_scores(image_emb, text_emb, candidate_emb, self.scoring)
        return {f"{self.name}_top1": float(np.mean(np.argmax(scores, axis=1) == self.labels))}
