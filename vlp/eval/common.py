"""What evaluators are built from: encoder functions over numpy batches, plus small ranking helpers."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np

Params = Any


@dataclasses.dataclass(frozen=True)
class Encoders:
    """encode_image(params, images [N, H, W, 3]) -> [N, D]; encode_text(params, tokens [N, L]) -> [N, D] (both
    L2-normalised numpy); tokenize(texts) -> int32 [N, L]; encode_patches(params, images) -> [N, P, D] patch tokens
    (None where the model has none). Image-only objectives have no text encoder (encode_text None)."""

    encode_image: Callable[[Params, np.ndarray], np.ndarray] | None
    encode_text: Callable[[Params, np.ndarray], np.ndarray] | None
    tokenize: Callable[[list[str]], np.ndarray]
    encode_patches: Callable[[Params, np.ndarray], np.ndarray] | None = None
    # caption(params, images, **decode options) -> one string per image (captioning objectives only).
    caption: Callable[..., list[str]] | None = None
    # itm_score(params, images [P, H, W, 3], tokens [P, L]) -> [P] matched-minus-unmatched logit (ITM objectives).
    itm_score: Callable[[Params, np.ndarray, np.ndarray], np.ndarray] | None = None
    # encode_signal(params, signals [N, T]) -> [N, D]: a third modality's tower (Symile) only.
    encode_signal: Callable[[Params, np.ndarray], np.ndarray] | None = None


def topk_indices(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest scores per row, best first: [N, M] -> [N, k] (stable for ties)."""
    k = min(k, scores.shape[1])
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]
