"""The embedded shapes dataset: determinism, disjoint splits, captions and masks true to the pixels, difficulty."""

import hashlib
import pickle
import re

import numpy as np
import pytest

from vlp.data import shapes

N_VAL = 3000  # validation examples shared by the statistical tests


@pytest.fixture(scope="module")
def val_examples():
    return [shapes.make_example("validation", i) for i in range(N_VAL)]


def _hash(image: np.ndarray) -> str:
    return hashlib.sha1(image.tobytes()).hexdigest()


def test_example_fields_shapes_and_dtypes():
    ex = shapes.make_example("train", 7, image_size=48)
    assert ex["image"].shape == (48, 48, 3) and ex["image"].dtype == np.uint8
    assert ex["mask"].shape == (48, 48) and ex["mask"].dtype == np.uint8
    assert 0 <= ex["label"] < len(shapes.CLASS_NAMES) == 64
    assert isinstance(ex["caption_noisy"], str) and isinstance(ex["caption_synthetic"], str)
    assert ex["index"] == 7


def test_vocabulary_constants():
    assert len(shapes.SHAPES) == len(shapes.COLOURS) == 8
    assert set(shapes.COLOUR_RGB) == set(shapes.COLOURS)
    assert shapes.CLASS_NAMES[3 * 8 + 5] == f"{shapes.COLOURS[3]} {shapes.SHAPES[5]}"
    assert shapes.SPLITS == ("train", "validation", "test")


def test_same_index_gives_identical_example():
    a, b = shapes.make_example("test", 123), shapes.make_example("test", 123)
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["mask"], b["mask"])
    assert (a["label"], a["caption_noisy"], a["caption_synthetic"]) == (
        b["label"], b["caption_noisy"], b["caption_synthetic"])


def test_content_does_not_depend_on_resolution():
    small, large = shapes.make_example("train", 11, 32), shapes.make_example("train", 11, 64)
    assert small["label"] == large["label"] and small["caption_synthetic"] == large["caption_synthetic"]
    main = small["label"] + 1
    area_small, area_large = (small["mask"] == main).sum(), (large["mask"] == main).sum()
    assert 3.3 < area_large / area_small < 4.8  # area scales with the square of the resolution


def test_splits_are_disjoint(val_examples):
    train = {_hash(shapes.make_example("train", i)["image"]) for i in range(3000)}
    val = {_hash(e["image"]) for e in val_examples[:1000]}
    test = {_hash(shapes.make_example("test", i)["image"]) for i in range(1000)}
    assert len(train) == 3000 and len(val) == 1000 and len(test) == 1000  # no repeats inside a split either
    assert not train & val and not train & test and not val & test


def test_same_index_differs_across_splits():
    images = [shapes.make_example(s, 5)["image"] for s in shapes.SPLITS]
    assert len({_hash(im) for im in images}) == 3


def test_synthetic_caption_names_label_size_and_position(val_examples):
    pattern = re.compile(r"a (small|medium|large) (\w+) (\w+) in the ((?:upper|lower) (?:left|right))")
    for ex in val_examples[:500]:
        m = pattern.fullmatch(ex["caption_synthetic"])
        assert m, ex["caption_synthetic"]
        assert f"{m.group(2)} {m.group(3)}" == shapes.CLASS_NAMES[ex["label"]]


def test_position_word_matches_main_shape_centroid(val_examples):
    for ex in val_examples:
        ys, xs = np.nonzero(ex["mask"] == ex["label"] + 1)
        cy, cx = ys.mean() + 0.5, xs.mean() + 0.5
        vertical = "upper" if cy < 16 else "lower"
        horizontal = "left" if cx < 16 else "right"
        assert ex["caption_synthetic"].endswith(f"in the {vertical} {horizontal}"), (ex["index"], cy, cx)
        assert min(abs(cy - 16), abs(cx - 16)) > 1.0  # clearly inside its quadrant


def test_size_word_matches_main_shape_area(val_examples):
    areas = {}
    for ex in val_examples:
        size = ex["caption_synthetic"].split()[1]
        shape = shapes.SHAPES[ex["label"] % 8]
        areas.setdefault((shape, size), []).append(int((ex["mask"] == ex["label"] + 1).sum()))
    for shape in shapes.SHAPES:
        small, medium, large = (areas[(shape, s)] for s in shapes.SIZES)
        # For each shape the three size words occupy disjoint pixel-area ranges.
        assert max(small) < min(medium) and max(medium) < min(large), shape
    # Main shapes span 11-22 px (area of a small square ~64 px, of a large circle up to ~380 px of 1024).
    all_areas = [a for v in areas.values() for a in v]
    assert 40 <= min(all_areas) and max(all_areas) <= 400


def test_mask_marks_main_shape_in_its_colour(val_examples):
    palette = np.array([shapes.COLOUR_RGB[c] for c in shapes.COLOURS], np.float64)
    for ex in val_examples[:1000]:
        main = ex["mask"] == ex["label"] + 1
        mean_rgb = ex["image"][main].astype(np.float64).mean(axis=0)
        nearest = np.argmin(((palette - mean_rgb) ** 2).sum(axis=1))
        assert nearest == ex["label"] // 8, (ex["index"], mean_rgb)
        # Other mask values are distractors: a different colour and a different shape from the main one.
        for value in set(np.unique(ex["mask"]).tolist()) - {0, ex["label"] + 1}:
            colour, shape = divmod(value - 1, 8)
            assert colour != ex["label"] // 8 and shape != ex["label"] % 8


def test_distractor_count_is_zero_to_two(val_examples):
    counts = np.array([len(set(np.unique(e["mask"]).tolist()) - {0}) - 1 for e in val_examples])
    assert counts.min() == 0 and counts.max() == 2
    assert 0.7 < counts.mean() < 1.2  # 0, 1 or 2 uniformly, minus a few placements that found no room


def test_background_never_looks_like_a_shape_colour(val_examples):
    for ex in val_examples[:500]:
        bg = ex["image"][ex["mask"] == 0].astype(np.int64)
        chroma = bg.max(axis=1) - bg.min(axis=1)
        assert chroma.max() <= 20  # grey: every named colour but white has chroma > 150
        assert bg.max() <= 175  # dark: white shapes are >= 200 in every channel


def test_classes_roughly_uniform(val_examples):
    counts = np.bincount([e["label"] for e in val_examples], minlength=64)
    assert counts.min() >= 20 and counts.max() <= 80  # expected 46.9 each, sd 6.8


def test_noisy_captions_agree_with_label(val_examples):
    def words_of(names, synonyms):
        return {n: {n, *synonyms[n]} for n in names}

    colour_words = words_of(shapes.COLOURS, shapes.COLOUR_SYNONYMS)
    shape_words = words_of(shapes.SHAPES, shapes.SHAPE_SYNONYMS)
    both = 0
    for ex in val_examples:
        text = f" {ex['caption_noisy']} "
        colour, shape = shapes.CLASS_NAMES[ex["label"]].split()
        has_colour = any(f" {w} " in text for w in colour_words[colour])
        has_shape = any(f" {w} " in text for w in shape_words[shape])
        assert has_colour or has_shape, ex["caption_noisy"]
        both += has_colour and has_shape
        for other in shapes.COLOURS:  # never contradicts the label
            assert other == colour or not any(f" {w} " in text for w in colour_words[other]), ex["caption_noisy"]
        for other in shapes.SHAPES:
            assert other == shape or not any(f" {w} " in text for w in shape_words[other]), ex["caption_noisy"]
    assert 0.86 < both / len(val_examples) < 0.94  # 10% drop one class word


def test_distinct_synthetic_captions_per_thousand():
    count = shapes.distinct_caption_count("validation", 1000)
    assert 500 <= count <= 800
    assert shapes.distinct_caption_count("validation", 1000, kind="noisy") > count


def test_all_captions_interleaves_both_kinds():
    captions = shapes.all_captions("test", 3)
    examples = [shapes.make_example("test", i) for i in range(3)]
    assert captions == [c for e in examples for c in (e["caption_noisy"], e["caption_synthetic"])]


def test_colour_histogram_baseline_is_weak():
    accuracy = shapes.colour_histogram_baseline(5000, 2000)
    assert 1 / 64 < accuracy <= 0.40


def test_colour_histogram_is_normalised():
    images = np.stack([shapes.make_example("train", i)["image"] for i in range(4)])
    hist = shapes.colour_histogram(images)
    assert hist.shape == (4, 64)
    np.testing.assert_allclose(hist.sum(axis=1), 1.0)


def test_class_prompts():
    prompts = shapes.class_prompts("blue star")
    assert len(prompts) == 16 and len(set(prompts)) == 16
    assert "a large blue star in the lower left" in prompts
    assert all("blue" in p and "star" in p for p in prompts)
    with pytest.raises(ValueError, match="valid classes"):
        shapes.class_prompts("blue hexagon")


def test_bad_arguments_raise_with_valid_values():
    with pytest.raises(ValueError, match="valid splits.*train.*validation.*test"):
        shapes.make_example("val", 0)
    with pytest.raises(ValueError, match=r"image_size must be an int in \[16, 1024\]"):
        shapes.make_example("train", 0, image_size=8)
    with pytest.raises(ValueError, match="image_size"):
        shapes.make_example("train", 0, image_size=32.0)
    with pytest.raises(ValueError, match="index"):
        shapes.make_example("train", -1)
    with pytest.raises(ValueError, match="valid splits"):
        shapes.ShapesSource("dev")
    with pytest.raises(ValueError, match="caption kind"):
        shapes.distinct_caption_count("train", 10, kind="long")


def test_source_is_a_picklable_random_access_source():
    source = shapes.ShapesSource("validation", num_examples=50, image_size=32)
    assert len(source) == 50 and len(shapes.ShapesSource("test")) == shapes.SPLIT_SIZES["test"] == 10_000
    clone = pickle.loads(pickle.dumps(source))
    a, b = source[np.int64(49)], clone[49]
    np.testing.assert_array_equal(a["image"], shapes.make_example("validation", 49)["image"])
    np.testing.assert_array_equal(a["image"], b["image"])
    with pytest.raises(IndexError):
        source[50]
