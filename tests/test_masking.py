"""MIM masks: exact ratio, block statistics (contiguous blocks of at least min_block patches), determinism per
generator, and the pipeline transform that adds them (drawn per visit: tests/test_per_visit.py)."""

import numpy as np
import pytest
from vlp.data import masking
from vlp.data.transforms import AddPatchMask, SelectCaption, visit_rng


def make_mask(kind, seed, visit, grid, ratio, min_block=4):
    return masking.make_mask(kind, visit_rng(seed, visit, "mim_mask"), grid, ratio, min_block)


def components(mask):
    """Sizes of the 4-connected blocks of masked patches (flood fill)."""
    seen, sizes = np.zeros_like(mask), []
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        stack, size = [start], 0
        seen[start] = True
        while stack:
            i, j = stack.pop()
            size += 1
            for a, b in ((i + 1, j), (i - 1, j), (i, j + 1), (i, j - 1)):
                if 0 <= a < mask.shape[0] and 0 <= b < mask.shape[1] and mask[a, b] and not seen[a, b]:
                    seen[a, b] = True
                    stack.append((a, b))
        sizes.append(size)
    return np.asarray(sizes, int)


@pytest.mark.parametrize("kind", masking.MASK_KINDS)
@pytest.mark.parametrize("grid,ratio", [((8, 8), 0.4), ((14, 14), 0.6), ((4, 4), 0.75)])
def test_exact_ratio_and_determinism(kind, grid, ratio):
    n = grid[0] * grid[1]
    masks = [make_mask(kind, 3, i, grid, ratio) for i in range(50)]
    assert all(m.shape == grid and m.dtype == bool and m.sum() == round(ratio * n) for m in masks)
    assert np.array_equal(masks[7], make_mask(kind, 3, 7, grid, ratio))  # a pure function of (seed, visit)
    assert not np.array_equal(masks[7], make_mask(kind, 4, 7, grid, ratio))
    if n >= 64:  # (a 4x4 grid has few distinct block masks)
        assert len({m.tobytes() for m in masks}) == 50


def test_block_masks_are_blocks_and_random_ones_are_not():
    grid, ratio, min_block = (14, 14), 0.4, 16  # EVA: 78 of 196 patches, blocks of >= 16
    block = [make_mask("block", 0, i, grid, ratio, min_block) for i in range(200)]
    rand = [make_mask("random", 0, i, grid, ratio) for i in range(200)]
    block_sizes = np.concatenate([components(m) for m in block])
    rand_sizes = np.concatenate([components(m) for m in rand])
    # Most masked patches sit in blocks of at least min_block patches; uniform masks scatter into small pieces.
    in_big = lambda sizes: sizes[sizes >= min_block].sum() / sizes.sum()  # noqa: E731
    assert in_big(block_sizes) > 0.9
    assert in_big(rand_sizes) < 0.6
    assert np.mean([len(components(m)) for m in block]) < 0.5 * np.mean([len(components(m)) for m in rand])
    # Block masks are spatially uniform on average (no corner bias): every quadrant gets 25% +- 3 points.
    mean = np.mean(block, axis=0)
    quadrants = [mean[:7, :7].sum(), mean[:7, 7:].sum(), mean[7:, :7].sum(), mean[7:, 7:].sum()]
    assert np.allclose(np.array(quadrants) / mean.sum(), 0.25, atol=0.03)


def test_bad_mask_arguments_are_named():
    with pytest.raises(ValueError, match="mask ratio 1.2"):
        make_mask("random", 0, 0, (4, 4), 1.2)
    with pytest.raises(ValueError, match="unknown mask kind 'grid'.*valid"):
        make_mask("grid", 0, 0, (4, 4), 0.5)


def test_transform_adds_masks_from_the_visit():
    transform = AddPatchMask(SelectCaption("noisy", 0), "block", (4, 4), 0.5, min_block=2, seed=1,
                             masked_image_fraction=0.5)
    records = [{"image": np.zeros((32, 32, 3), np.uint8), "caption_noisy": "a", "caption_synthetic": "b",
                "label": 0, "index": 0, "visit": i} for i in range(400)]
    masks = np.stack([transform.map(r)["mim_mask"] for r in records])
    assert masks.shape == (400, 16)
    masked = masks.any(axis=1)
    assert 0.42 < masked.mean() < 0.58  # masked_image_fraction
    assert (masks[masked].sum(axis=1) == 8).all()
    assert np.array_equal(masks[5], transform.map(records[5])["mim_mask"])
    np.testing.assert_array_equal(masks[5].reshape(4, 4), make_mask("block", 1, 5, (4, 4), 0.5, 2)
                                  if masked[5] else np.zeros((4, 4), bool))
    with pytest.raises(KeyError, match="no 'visit' field .*make_train_dataset stamps it"):
        transform.map({k: v for k, v in records[0].items() if k != "visit"})
