"""Patch masks for masked-image modelling, drawn from a given generator. The training stream draws one per visit
from (seed, position in the training stream) (`vlp.data.transforms.AddPatchMask`): every epoch masks afresh and a
resumed run sees the same masks as the uninterrupted one.

- `random_mask` (MAE): exactly round(ratio * N) of the N patches, uniformly at random.
- `block_mask` (BEiT / SimMIM / EVA / iBOT): rectangles of at least `min_block` patches with aspect ratio in
  [0.3, 1/0.3] are added until round(ratio * N) patches are masked; the last few (when no further block fits the
  remaining budget) are topped up at random, so every mask has exactly the requested count (static shapes on device).
Masks are bool [grid_h, grid_w] with True = masked.
"""

from __future__ import annotations

import math

import numpy as np

MASK_KINDS = ("block", "random")

def num_masked(num_patches: int, ratio: float) -> int:
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"mask ratio {ratio} is not in [0, 1)")
    return int(round(ratio * num_patches))


def random_mask(rng: np.random.Generator, grid: tuple[int, int], ratio: float) -> np.ndarray:
    """bool [gh, gw] with exactly round(ratio * gh * gw) True entries, uniformly placed."""
    n = grid[0] * grid[1]
    mask = np.zeros(n, bool)
    mask[rng.permutation(n)[:num_masked(n, ratio)]] = True
    return mask.reshape(grid)


def block_mask(rng: np.random.Generator, grid: tuple[int, int], ratio: float, min_block: int = 4,
               aspect: tuple[float, float] = (0.3, 1 / 0.3), max_tries: int = 10) -> np.ndarray:
    """BEiT's block-wise masking: bool [gh, gw] with exactly round(ratio * gh * gw) True entries."""
    gh, gw = grid
    target = num_masked(gh * gw, ratio)
    if min_block < 1:
        raise ValueError(f"min block size {min_block} must be >= 1 patch")
    mask = np.zeros(grid, bool)
    count = 0
    log_aspect = (math.log(aspect[0]), math.log(aspect[1]))
    while count < target:
        budget = target - count
        added = 0
        for _ in range(max_tries):
            area = rng.uniform(min(min_block, budget), max(min_block, budget))
            r = math.exp(rng.uniform(*log_aspect))
            h, w = int(round(math.sqrt(area * r))), int(round(math.sqrt(area / r)))
            if not (1 <= h <= gh and 1 <= w <= gw):
                continue
            top, left = rng.integers(0, gh - h + 1), rng.integers(0, gw - w + 1)
            window = mask[top:top + h, left:left + w]
            new = h * w - int(window.sum())
            if 0 < new <= budget:
                window[:] = True
                added = new
                break
        if not added:
            break
        count += added
    if count < target:  # no block fits the last few patches: top up at random
        free = np.flatnonzero(~mask.ravel())
        mask.ravel()[rng.choice(free, target - count, replace=False)] = True
    return mask


def make_mask(kind: str, rng: np.random.Generator, grid: tuple[int, int], ratio: float,
              min_block: int = 4) -> np.ndarray:
    """A mask of `kind` drawn from `rng`: bool [gh, gw]."""
    if kind == "random":
        return random_mask(rng, grid, ratio)
    if kind == "block":
        return block_mask(rng, grid, ratio, min_block)
    raise ValueError(f"unknown mask kind {kind!r}; valid: {MASK_KINDS}")
