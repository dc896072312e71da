"""Frozen image features of a labelled train split and an eval split: what the linear probe and kNN fit on."""

from __future__ import annotations

import dataclasses

import numpy as np

from vlp.data import pipeline, sources
from vlp.eval.common import Encoders, Params


@dataclasses.dataclass
class LabelledImages:
    """Images float32 [N, H, W, 3] in the model's input range, labels int32 [N] (>= 0)."""

    images: np.ndarray
    labels: np.ndarray


def load_labelled_images(data_source: str, split: str, image_size: int, num_examples: int,
                         evaluator: str) -> LabelledImages:
    """The first `num_examples` labelled records of a split; unlabelled records (label -1) are an error."""
    eval_set = pipeline.load_eval_set(sources.make_source(data_source, split, image_size), num_examples)
    if (eval_set.labels < 0).any():
        raise ValueError(f"evals.{evaluator}: split {split!r} of data source {data_source!r} has unlabelled records "
                         "(label -1); a linear probe or kNN needs a labelled set (e.g. a class-folder tree)")
    return LabelledImages(eval_set.images, eval_set.labels)


class FeatureEvaluator:
    """Base of the evaluators that fit on frozen image embeddings of a train split and score an eval split.

    Subclasses implement `score(train_x, train_y, eval_x, eval_y) -> dict` (features [N, D] float32).
    """

    def __init__(self, encoders: Encoders, train: LabelledImages, test: LabelledImages, name: str):
        self.encoders, self.train, self.test, self.name = encoders, train, test, name
        self.num_classes = int(max(train.labels.max(), test.labels.max())) + 1

    @classmethod
    def build(cls, encoders: Encoders, *, name: str, data_source: str, split: str, image_size: int,
              num_examples: int, train_split: str = "train", num_train: int = 5000, **options):
        train = load_labelled_images(data_source, train_split, image_size, num_train, name)
        test = load_labelled_images(data_source, split, image_size, num_examples, name)
        return cls(encoders, train, test, name=name, **options)

    def score(self, train_x: np.ndarray, train_y: np.ndarray, eval_x: np.ndarray,
              eval_y: np.ndarray) -> dict[str, float]:
        raise NotImplementedError

    def run(self, params: Params) -> dict[str, float]:
        train_x = np.asarray(self.encoders.encode_image(params, self.train.images), np.float32)
        eval_x = np.asarray(self.encoders.encode_image(params, self.test.images), np.float32)
        scores = self.score(train_x, self.train.labels, eval_x, self.test.labels)
        return {f"{self.name}_{k}": v for k, v in scores.items()}
