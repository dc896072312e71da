"""ArrayRecord and TFDS sources, the random resized crop, mixtures, exact resume over shards with 2 grain workers,
corrupt records skipped and counted, and config validation of source specs."""

import pickle

import grain
import numpy as np
import pytest
from absl import flags
from conftest import tiny_config
from make_data import write_record_shards

from vlp import config as vlp_config
from vlp.data import augment, sources
from vlp.data.pipeline import SourceStream, TrainStreamSpec, make_train_dataset
from vlp.data.tokenizer import Tokenizer
from vlp.data.transforms import SKIPPED_KEY, SelectCaption, TokenizeBatch

CORRUPT = (5, 17)
N = 48


@pytest.fixture(scope="module")
def spec(tmp_path_factory):
    return write_record_shards(tmp_path_factory.mktemp("shards"), N, corrupt=CORRUPT)


def stream(streams, spec_):
    return make_train_dataset(streams, SelectCaption("both", spec_.seed), TokenizeBatch(Tokenizer(), 12), spec_)


def crop_streams(spec, weight=1.0):
    return [SourceStream(sources.make_source(spec, "train", 16), weight, augment.RandomResizedCrop(16))]


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def test_crop_boxes_cover_the_scale_range_and_stay_inside():
    rng = np.random.default_rng(0)
    boxes = [augment.crop_box(40, 48, (0.5, 1.0), (3 / 4, 4 / 3), rng) for _ in range(300)]
    for top, left, h, w in boxes:
        assert 0 <= top and top + h <= 40 and 0 <= left and left + w <= 48
    fractions = np.array([h * w for _, _, h, w in boxes]) / (40 * 48)
    assert fractions.min() >= 0.47 and fractions.max() <= 1.0 and fractions.std() > 0.05  # rounding: 0.47


def test_crop_and_flip_are_a_pure_function_of_the_generator():
    image = np.arange(40 * 48 * 3, dtype=np.uint8).reshape(40, 48, 3)
    crop = augment.RandomResizedCrop(16, (1.0, 1.0), flip=True, ratio=(48 / 40, 48 / 40))
    outputs = [crop.random_map({"image": image}, np.random.default_rng(s))["image"] for s in range(8)]
    whole = augment._resize(image, (16, 16))
    assert all(o.shape == (16, 16, 3) for o in outputs)
    flipped = [np.array_equal(o, whole[:, ::-1]) for o in outputs]
    assert all(f or np.array_equal(o, whole) for f, o in zip(flipped, outputs)) and 0 < sum(flipped) < 8
    np.testing.assert_array_equal(crop.random_map({"image": image}, np.random.default_rng(3))["image"], outputs[3])


def test_resize_center_crop_keeps_the_middle():
    image = np.zeros((20, 40, 3), np.uint8)
    image[:, 10:30] = 255  # the central square is white
    out = augment.resize_center_crop(image, 10)
    assert out.shape == (10, 10, 3) and out[:, 1:-1].min() == 255  # edge columns blend with the black sides
    same = np.ones((10, 10, 3), np.uint8)
    assert augment.resize_center_crop(same, 10) is same


def test_corrupt_records_are_skipped_and_counted(spec):
    source = sources.make_source(spec, "train", 16)
    with pytest.raises(ValueError, match="not a vlp record"):
        source[CORRUPT[0]]
    batches = take(iter(stream(crop_streams(spec), TrainStreamSpec(8, seed=4))), 12)  # 2 epochs
    # Independent count: how often the shuffled order (same seed) draws a corrupt index.
    order = grain.MapDataset.range(N).shuffle(seed=4).repeat(None)
    expected = sum(order[i] in CORRUPT for i in range(12 * 8))
    assert expected == 4 and sum(int(b[SKIPPED_KEY].sum()) for b in batches) == expected
    assert all(b["image"].shape == (8, 16, 16, 3) for b in batches)


def test_two_worker_pipeline_over_shards_resumes_exactly(spec):
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    spec_ = TrainStreamSpec(8, seed=3, worker_count=2)
    first = iter(stream(crop_streams(spec), spec_))
    take(first, 2)
    state = first.get_state()  # what the trainer checkpoints at step 2
    expected = take(first, 3)
    first.close()
    resumed = iter(stream(crop_streams(spec), spec_))
    resumed.set_state(state)
    got = take(resumed, 3)
    resumed.close()
    for a, b in zip(got, expected, strict=True):
        for key in ("image", "text", "label", SKIPPED_KEY):
            np.testing.assert_array_equal(a[key], b[key])


def test_mixture_follows_the_weights_and_resumes(spec, tmp_path):
    other = write_record_shards(tmp_path / "other", 20, size=(24, 24), synthetic=False, label_offset=10)
    streams = crop_streams(spec, 3.0) + crop_streams(other, 1.0)
    spec_ = TrainStreamSpec(16, seed=0)
    it = iter(stream(streams, spec_))
    labels = np.concatenate([b["label"] for b in take(it, 10)])
    assert 0.15 < (labels >= 10).mean() < 0.35  # weight 1 of 4: labels >= 10 come from the second set
    state = it.get_state()
    more = take(it, 2)
    resumed = iter(stream(streams, spec_))
    resumed.set_state(state)
    for got, want in zip(take(resumed, 2), more, strict=True):
        np.testing.assert_array_equal(got["text"], want["text"])
        np.testing.assert_array_equal(got["image"], want["image"])


def test_tfds_source_reads_through_data_source_without_tensorflow():
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE):
        source = sources.make_source("tfds:mnist", "test", 28)
        record = source[2]
        assert len(source) == 6 and record["image"].shape == (28, 28, 3) and record["image"].dtype == np.uint8
        assert record["caption_noisy"] == f"a photo of a {record['label']}." and 0 <= record["label"] < 10
        assert sources.class_names("tfds:mnist") == tuple(str(i) for i in range(10))
        assert pickle.loads(pickle.dumps(source))[2]["label"] == record["label"]  # grain workers get a copy
    with pytest.raises(ValueError, match="tfds:no_such_set_xyz: DatasetNotFoundError"):
        sources.make_source("tfds:no_such_set_xyz", "train", 28)


def test_config_rejects_bad_source_specs(spec, tmp_path):
    def check(message, **updates):
        with pytest.raises(ValueError, match=message):
            vlp_config.validate(tiny_config(**updates))

    check(r"unknown data source 'imagenet'; valid forms: \['shapes', 'shapes:classes=<lo>-<hi>', 'shapes:xor', "
          r"'arrayrecord:", **{"data.source": "imagenet"})
    check("no manifest at", **{"data.source": f"arrayrecord:{tmp_path}"})
    check("data.train_split='valid' is not a split of", **{"data.source": spec, "data.train_split": "valid"})
    check("is not '<source spec>=<weight > 0>'", **{"data.mixture": "('shapes',)"})
    nosynth = write_record_shards(tmp_path / "nosynth", 4, synthetic=False)
    check("has no synthetic captions", **{"data.mixture": f"('{nosynth}=1',)", "data.train_caption": "synthetic"})
    config = tiny_config(**{"data.mixture": f"('shapes=2', '{spec}=1')"})
    vlp_config.validate(config)
    assert vlp_config.parse_mixture(config.data.mixture) == [("shapes", 2.0), (spec, 1.0)]


def test_eval_set_resizes_and_center_crops_real_images(spec):
    from vlp.data.pipeline import load_eval_set

    source = sources.make_source(spec, "train", 16)
    eval_set = load_eval_set(source, 4)  # records 0-3 are intact; images are stored at 40x48
    assert eval_set.images.shape == (4, 16, 16, 3) and eval_set.images.dtype == np.float32
    expected = augment.resize_center_crop(source[2]["image"], 16).astype(np.float32) * (2 / 255) - 1
    np.testing.assert_allclose(eval_set.images[2], expected, atol=1e-6)
    assert eval_set.captions["all"] == [[f"caption {i}"] for i in range(4)]
    assert eval_set.captions["synthetic"][1] == "synthetic caption 1"
