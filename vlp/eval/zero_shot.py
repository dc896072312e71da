"""Zero-shot classification: class embeddings from (ensembles of) text prompts, top-1/top-5 of images."""

from __future__ import annotations

import numpy as np

from vlp.data import pipeline, sources
from vlp.eval.common import Encoders, Params, topk_indices


def class_embeddings(text_emb: np.ndarray, prompts_per_class: list[int]) -> np.ndarray:
    """Mean of each class's normalised prompt embeddings, renormalised (CLIP's prompt ensembling).

    text_emb [sum(prompts_per_class), D] -> [num_classes, D].
    """
    bounds = np.cumsum([0] + list(prompts_per_class))
    means = np.stack([text_emb[a:b].mean(axis=0) for a, b in zip(bounds[:-1], bounds[1:])])
    return means / np.linalg.norm(means, axis=1, keepdims=True)


def topk_accuracy(image_emb: np.ndarray, class_emb: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Fraction of images whose label is among the k classes of highest cosine similarity."""
    top = topk_indices(image_emb @ class_emb.T, k)
    return float((top == labels[:, None]).any(axis=1).mean())


class ZeroShotEvaluator:
    """Yields `zeroshot_top1` and `zeroshot_top5` (key prefix = `name`)."""

    def __init__(self, encoders: Encoders, images: np.ndarray, labels: np.ndarray, class_prompts: list[list[str]],
                 name: str = "zeroshot"):
        if labels.max(initial=0) >= len(class_prompts):
            raise ValueError(f"labels go up to {labels.max()} but only {len(class_prompts)} classes have prompts")
        self.encoders, self.images, self.labels, self.name = encoders, images, labels, name
        self.prompt_counts = [len(p) for p in class_prompts]
        self.prompt_tokens = encoders.tokenize([p for prompts in class_prompts for p in prompts])

    @classmethod
    def build(cls, encoders: Encoders, *, name: str, data_source: str, split: str, image_size: int,
              num_examples: int, prompt_ensemble: bool = True, **unused) -> "ZeroShotEvaluator":
        """The first `num_examples` images of a labelled source's split; each class is the mean of its prompt
        ensemble (or only its first prompt with `prompt_ensemble=False`)."""
        eval_set = pipeline.load_eval_set(sources.make_source(data_source, split, image_size), num_examples)
        prompts = [sources.class_prompts(data_source, c) for c in sources.class_names(data_source)]
        if not prompt_ensemble:
            prompts = [p[:1] for p in prompts]
        return cls(encoders, eval_set.images, eval_set.labels, prompts, name=name)

    def run(self, params: Params) -> dict[str, float]:
        class_emb = class_embeddings(self.encoders.encode_text(params, self.prompt_tokens), self.prompt_counts)
        image_emb = self.encoders.encode_image(params, self.images)
        return {f"{self.name}_top{k}": topk_accuracy(image_emb, class_emb, self.labels, k) for k in (1, 5)}
