"""Captioning metrics on held-out images: CIDEr and BLEU-4 (pycocoevalcap's pure-Python scorers on pre-tokenised
text, no Java) and the exact-match rate against one reference caption (on shapes: the synthetic caption, which the
image fully determines)."""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from vlp.data import pipeline, sources
from vlp.eval.common import Encoders, Params

DECODE_OPTIONS = ("method", "beams", "length_penalty", "temperature", "top_k", "top_p", "max_len")


def normalize_caption(text: str) -> str:
    """Lower-case words separated by single spaces, punctuation dropped (COCO's PTB tokenisation, roughly)."""
    return " ".join(re.findall(r"[a-z0-9']+", text.lower()))


def caption_scores(predictions: list[str], references: list[list[str]]) -> dict[str, float]:
    """Corpus CIDEr(-D, pycocoevalcap's `Cider`), BLEU-4 and exact match (the prediction equals one of its
    references) of one prediction per image against that image's references, all after `normalize_caption`."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    if len(predictions) != len(references) or not predictions:
        raise ValueError(f"need one prediction per image: {len(predictions)} predictions, {len(references)} "
                         "reference lists")
    res = {i: [normalize_caption(p) or "<empty>"] for i, p in enumerate(predictions)}
    gts = {i: [normalize_caption(r) for r in refs] for i, refs in enumerate(references)}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    exact = np.mean([res[i][0] in gts[i] for i in res])
    return {"cider": float(cider), "bleu4": float(bleu[3]), "exact_match": float(exact)}


def default_eval(num_examples: int = 500, split: str = "validation", **options: Any) -> dict[str, Any]:
    """The `evals.captioning` entry the CoCa / CapPa configs use: greedy captions of the validation split scored
    against the synthetic caption (`--set evals.captioning.method=beam` switches to 4-beam search)."""
    return {"type": "captioning", "split": split, "num_examples": num_examples, "batch_size": 250,
            "caption": "synthetic", "method": "greedy", "beams": 4, "length_penalty": 0.6, **options}


class CaptioningEvaluator:
    """Yields `<name>_cider`, `<name>_bleu4` and `<name>_exact_match`; needs `encoders.caption`."""

    def __init__(self, encoders: Encoders, images: np.ndarray, references: list[list[str]], name: str = "captioning",
                 decode: dict[str, Any] | None = None):
        if encoders.caption is None:
            raise ValueError("the captioning evaluator needs an objective that writes captions (coca, cappa)")
        self.encoders, self.images, self.references, self.name = encoders, images, references, name
        self.decode = dict(decode or {})

    @classmethod
    def build(cls, encoders: Encoders, *, name: str, data_source: str, split: str, image_size: int,
              num_examples: int, caption: str = "synthetic", **options: Any) -> "CaptioningEvaluator":
        """The first `num_examples` images of a split; references: the captions of kind `caption` (`all`: every
        caption of the image). Decoding options (`DECODE_OPTIONS`: method greedy|beam|sample, beams, ...) go to the
        objective's decoder."""
        unknown = sorted(set(options) - set(DECODE_OPTIONS))
        if unknown:
            raise ValueError(f"unknown captioning evaluator options {unknown}; valid: {sorted(DECODE_OPTIONS)}, "
                             "caption, num_examples, split, batch_size")
        eval_set = pipeline.load_eval_set(sources.make_source(data_source, split, image_size), num_examples)
        if caption not in eval_set.captions:
            raise ValueError(f"caption={caption!r} is not a caption kind of {data_source!r}; valid: "
                             f"{sorted(eval_set.captions)}")
        refs = [r if isinstance(r, list) else [r] for r in eval_set.captions[caption]]
        return cls(encoders, eval_set.images, refs, name=name, decode=options)

    def run(self, params: Params) -> dict[str, float]:
        predictions = self.encoders.caption(params, self.images, **self.decode)
        return {f"{self.name}_{k}": v for k, v in caption_scores(predictions, self.references).items()}
