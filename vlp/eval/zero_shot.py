"""Zero-shot classification: class embeddings from (ensembles of) text prompts, top-1/top-5 of images."""

from __future__ import annotations

import numpy as np

from vlp.data import pipeline, sources
from vlp.eval import prompts as prompt_sets
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


def class_prompt_lists(data_source: str, class_names: str = "", templates: str = "") -> list[list[str]]:
    """The prompt ensemble of every class, in label order.

    Class names: a bundled list or file (`class_names`), else the source's own. Prompts: `templates` (a bundled set
    or file) filled with each name; else, for the source's own names, the source's prompts (`sources.class_prompts`:
    shapes' caption-style prompts, generic photo templates for other sets); else (names from a list) `clip80`.
    """
    if templates or class_names:
        names = prompt_sets.load_class_names(class_names) if class_names else list(sources.class_names(data_source))
        return prompt_sets.fill_templates(prompt_sets.load_templates(templates or "clip80"), names)
    return [sources.class_prompts(data_source, name) for name in sources.class_names(data_source)]


class ZeroShotEvaluator:
    """Yields `zeroshot_top1` and `zeroshot_top5` (key prefix = `name`)."""

    def __init__(self, encoders: Encoders, images: np.ndarray, labels: np.ndarray, class_prompts: list[list[str]],
                 name: str = "zeroshot"):
        if labels.min(initial=0) < 0 or labels.max(initial=0) >= len(class_prompts):
            raise ValueError(f"labels span [{labels.min()}, {labels.max()}] but only {len(class_prompts)} classes "
                             "have prompts; check the class-name list against the eval set's labels")
        self.encoders, self.images, self.labels, self.name = encoders, images, labels, name
        self.prompt_counts = [len(p) for p in class_prompts]
        self.prompt_tokens = encoders.tokenize([p for prompts in class_prompts for p in prompts])

    @classmethod
    def build(cls, encoders: Encoders, *, name: str, data_source: str, split: str, image_size: int,
              num_examples: int, prompt_ensemble: bool = True, class_names: str = "", templates: str = "",
              **unused) -> "ZeroShotEvaluator":
        """The first `num_examples` images of a labelled source's split; each class is the mean of its prompt
        ensemble (or only its first prompt with `prompt_ensemble=False`). See `class_prompt_lists` for
        `class_names` and `templates`."""
        eval_set = pipeline.load_eval_set(sources.make_source(data_source, split, image_size), num_examples)
        prompts = class_prompt_lists(data_source, class_names, templates)
        if not prompt_ensemble:
            prompts = [p[:1] for p in prompts]
        return cls(encoders, eval_set.images, eval_set.labels, prompts, name=name)

    def run(self, params: Params) -> dict[str, float]:
        class_emb = class_embeddings(self.encoders.encode_text(params, self.prompt_tokens), self.prompt_counts)
        image_emb = self.encoders.encode_image(params, self.images)
        return {f"{self.name}_top{k}": topk_accuracy(image_emb, class_emb, self.labels, k) for k in (1, 5)}
