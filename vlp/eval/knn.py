"""Weighted k-nearest-neighbour classification on frozen image embeddings (the DINO/InstDisc protocol).

Each eval image votes over its k most cosine-similar train images with weights exp(similarity / T); the class
with the largest summed weight wins. Yields `<name>_top1` for the first k (default 10) and `<name>_top1_k<k>` for
the others (default 20).
"""

from __future__ import annotations

import numpy as np

from vlp.eval.common import topk_indices
from vlp.eval.features import FeatureEvaluator

_ROWS_PER_CHUNK = 1024  # eval rows scored at once: bounds the [rows, N_train] similarity block


def knn_predict(train_x: np.ndarray, train_y: np.ndarray, eval_x: np.ndarray, k: int, num_classes: int,
                temperature: float = 0.07) -> np.ndarray:
    """train_x [N, D], train_y [N] int, eval_x [M, D] -> predicted labels [M] (features need not be normalised)."""
    if k < 1 or temperature <= 0:
        raise ValueError(f"kNN needs k >= 1 and temperature > 0, got k={k}, temperature={temperature}")
    normalise = lambda x: x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)  # noqa: E731
    train_x, eval_x = normalise(train_x), normalise(eval_x)
    predictions = []
    for start in range(0, len(eval_x), _ROWS_PER_CHUNK):
        sims = eval_x[start:start + _ROWS_PER_CHUNK] @ train_x.T  # [m, N]
        top = topk_indices(sims, k)  # [m, k]
        weights = np.exp(np.take_along_axis(sims, top, axis=1) / temperature)
        votes = np.zeros((len(top), num_classes))
        np.add.at(votes, (np.arange(len(top))[:, None], train_y[top]), weights)
        predictions.append(votes.argmax(axis=1))
    return np.concatenate(predictions)


class KnnEvaluator(FeatureEvaluator):
    """Options: `ks` (default (10, 20)), `temperature` (0.07), plus FeatureEvaluator's `train_split`, `num_train`."""

    def __init__(self, encoders, train, test, name: str = "knn", ks: tuple[int, ...] = (10, 20),
                 temperature: float = 0.07):
        super().__init__(encoders, train, test, name)
        self.ks, self.temperature = tuple(ks), float(temperature)

    def score(self, train_x, train_y, eval_x, eval_y) -> dict[str, float]:
        # The first k is the headline `top1` (the project's flat key `knn_top1`); the others carry their k.
        return {"top1" if i == 0 else f"top1_k{k}": float((knn_predict(
            train_x, train_y, eval_x, k, self.num_classes, self.temperature) == eval_y).mean())
            for i, k in enumerate(self.ks)}
