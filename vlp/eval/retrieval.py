"""Image <-> text retrieval recall@k on held-out pairs.

Several images can share a caption text (a procedural or templated dataset repeats texts), so a hit is scored by
text, not by index: image->text counts a hit when one of the k retrieved captions has the same text as the
image's own caption; text->image when one of the k retrieved images has a caption with the query's text.
With all texts distinct this is the usual index-based recall.
"""

from __future__ import annotations

import numpy as np

from vlp.data import pipeline, sources
from vlp.eval.common import Encoders, Params, topk_indices

KS = (1, 5, 10)


def recall_at_k(image_emb: np.ndarray, text_emb: np.ndarray, captions: list[str],
                ks: tuple[int, ...] = KS) -> dict[str, float]:
    """image_emb [N, D], text_emb [N, D] (row i = caption i of image i) -> {i2t_r1, ..., t2i_r10}."""
    _, caption_ids = np.unique(np.asarray(captions, dtype=object).astype(str), return_inverse=True)
    same_text = caption_ids[:, None] == caption_ids[None, :]  # [N images, N captions]
    scores = image_emb @ text_emb.T
    out = {}
    for k in ks:
        i2t = topk_indices(scores, k)  # [N, k] caption indices
        out[f"i2t_r{k}"] = float(np.take_along_axis(same_text, i2t, axis=1).any(axis=1).mean())
        t2i = topk_indices(scores.T, k)  # [N, k] image indices
        out[f"t2i_r{k}"] = float(np.take_along_axis(same_text.T, t2i, axis=1).any(axis=1).mean())
    return out


class RetrievalEvaluator:
    """Yields `retrieval_i2t_r{1,5,10}` and `retrieval_t2i_r{1,5,10}` (key prefix = `name`)."""

    def __init__(self, encoders: Encoders, images: np.ndarray, captions: list[str], name: str = "retrieval"):
        if len(images) != len(captions):
            raise ValueError(f"{len(images)} images but {len(captions)} captions; retrieval needs one per image")
        self.encoders, self.images, self.captions, self.name = encoders, images, captions, name
        self.tokens = encoders.tokenize(captions)

    @classmethod
    def build(cls, encoders: Encoders, *, name: str, data_source: str, split: str, image_size: int,
              num_examples: int, caption: str = "synthetic", **unused) -> "RetrievalEvaluator":
        """The first `num_examples` pairs of a source's split, with the captions of kind `caption`."""
        eval_set = pipeline.load_eval_set(sources.make_source(data_source, split, image_size), num_examples)
        if caption not in eval_set.captions:
            raise ValueError(f"evals.{name}.caption={caption!r}; valid: {sorted(eval_set.captions)}")
        return cls(encoders, eval_set.images, eval_set.captions[caption], name=name)

    def run(self, params: Params) -> dict[str, float]:
        image_emb = self.encoders.encode_image(params, self.images)
        text_emb = self.encoders.encode_text(params, self.tokens)
        return {f"{self.name}_{k}": v for k, v in recall_at_k(image_emb, text_emb, self.captions).items()}
