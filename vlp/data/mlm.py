"""Masked language modelling (BERT's recipe, as ALBEF, TCL and UNITER train it): which tokens to predict and what
the model sees in their place, drawn per visit of the training stream (see vlp.data.transforms).

Of the tokens that are not special (padding, end and begin of text never are), each is chosen with probability
`prob` (0.15); a chosen token becomes the mask id with probability 0.8, a random non-special token with 0.1, and
stays itself with 0.1. Labels hold the original id at chosen positions and `IGNORE_LABEL` elsewhere.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from vlp.data.transforms import visit_of, visit_rng

IGNORE_LABEL = -100  # label of positions that are not predicted (torch's CrossEntropyLoss default)
MLM_TEXT_KEY = "mlm_text"
MLM_LABELS_KEY = "mlm_labels"


def mlm_vocab_size(tokenizer: Any) -> int:
    """Rows of an embedding table that holds every id the tokenizer returns and its mask id."""
    return max(tokenizer.vocab_size, tokenizer.mask_id + 1)


def _random_tokens(rng: np.random.Generator, shape: tuple[int, ...], vocab_size: int,
                   special_ids: Sequence[int]) -> np.ndarray:
    """Uniform draws from the ids in [0, vocab_size) that are not special (rank r -> the r-th non-special id)."""
    specials = sorted({int(s) for s in special_ids if 0 <= s < vocab_size})
    ids = rng.integers(0, vocab_size - len(specials), shape)
    for special in specials:  # ascending: shift every id at or past a special one up by one
        ids = ids + (ids >= special)
    return ids


def mlm_mask(tokens: np.ndarray, rng: np.random.Generator, mask_id: int, vocab_size: int,
             special_ids: Sequence[int], prob: float = 0.15, mask_share: float = 0.8,
             random_share: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """BERT masking of token ids [..., L] -> (masked ids [..., L] int32, labels [..., L] int32).

    `vocab_size`: random replacements are drawn from [0, vocab_size) minus `special_ids` (never the mask id).
    Labels are the original id where a token was chosen, `IGNORE_LABEL` elsewhere.
    """
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"MLM masking probability {prob} is not in [0, 1]")
    if mask_share < 0 or random_share < 0 or mask_share + random_share > 1.0:
        raise ValueError(f"MLM shares mask={mask_share}, random={random_share} must be >= 0 and sum to <= 1 (the "
                         "rest of the chosen tokens stay unchanged)")
    tokens = np.asarray(tokens)
    maskable = ~np.isin(tokens, np.asarray(list(special_ids), tokens.dtype))
    chosen = maskable & (rng.random(tokens.shape) < prob)
    how = rng.random(tokens.shape)
    replacements = _random_tokens(rng, tokens.shape, vocab_size, special_ids)
    masked = np.where(chosen & (how < mask_share), mask_id, tokens)
    masked = np.where(chosen & (how >= mask_share) & (how < mask_share + random_share), replacements, masked)
    labels = np.where(chosen, tokens, IGNORE_LABEL)
    return masked.astype(np.int32), labels.astype(np.int32)


@dataclasses.dataclass
class AddMLMMask(grain.transforms.Map):
    """Runs `inner` (which yields one "caption") and adds `MLM_TEXT_KEY` (the caption's ids, masked) and
    `MLM_LABELS_KEY` int32 [max_len], drawn afresh at every visit from (seed, visit).

    The caption itself stays, so the batch transform also tokenises it unmasked into "text" (contrastive and ITM
    inputs); the two agree position by position because both use `tokenizer.encode`.
    """

    inner: grain.transforms.Map
    tokenizer: Any
    max_len: int
    seed: int = 0
    prob: float = 0.15

    def map(self, example: dict) -> dict:
        out = self.inner.map(example)
        tokens = self.tokenizer.encode([str(out["caption"])], self.max_len)[0]
        rng = visit_rng(self.seed, visit_of(example), "mlm_mask")
        tok = self.tokenizer
        out[MLM_TEXT_KEY], out[MLM_LABELS_KEY] = mlm_mask(tokens, rng, tok.mask_id, tok.vocab_size,
                                                          tok.special_ids, self.prob)
        return out
