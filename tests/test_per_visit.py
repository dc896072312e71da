"""Randomness per visit, not per record: an image seen in two epochs gets two masks (and caption choices, crops),
the masked share holds per epoch while the unmasked images change, and the same global example draws the same in
1 process as in 2 (and with grain workers)."""

import dataclasses

import grain
import numpy as np
import pytest
from make_data import write_record_shards

from vlp.data.augment import RandomResizedCrop
from vlp.data.pipeline import SourceStream, TrainStreamSpec, make_train_dataset
from vlp.data.sources import make_source
from vlp.data.transforms import AddPatchMask, pick_caption

EPOCH = 200  # records in the source: positions [e * EPOCH, (e + 1) * EPOCH) of the stream are epoch e


@dataclasses.dataclass
class Keep(grain.transforms.Map):
    """Keeps what identifies the record (index, image) and the caption drawn for this visit."""

    def map(self, example):
        return {"index": np.int64(example["index"]), "image": example["image"],
                "caption": pick_caption(example, "both", 0, 0.5)}


@dataclasses.dataclass
class Stack(grain.transforms.Map):
    def map(self, batch):
        return batch


def stream(spec, source=None, fraction=0.5):
    source = make_source("shapes", "train", 32, num_examples=EPOCH) if source is None else source
    transform = AddPatchMask(Keep(), "random", (4, 4), 0.5, seed=spec.seed, masked_image_fraction=fraction)
    return iter(make_train_dataset(source, transform, Stack(), spec))


def concat(iterator, num_batches):
    batches = [next(iterator) for _ in range(num_batches)]
    return {key: np.concatenate([b[key] for b in batches]) for key in batches[0]}


@pytest.fixture(scope="module")
def two_epochs():
    """The first two epochs of the stream (batch 40: 5 batches per epoch), keyed by record index per epoch."""
    seen = concat(stream(TrainStreamSpec(40, seed=0)), 2 * EPOCH // 40)
    epochs = []
    for e in range(2):
        part = slice(e * EPOCH, (e + 1) * EPOCH)
        order = np.argsort(seen["index"][part])
        assert np.array_equal(seen["index"][part][order], np.arange(EPOCH))  # each record once per epoch
        epochs.append({key: value[part][order] for key, value in seen.items()})
    return epochs


def test_an_image_gets_a_new_mask_in_every_epoch(two_epochs):
    first, second = two_epochs
    both = first["mim_mask"].any(axis=1) & second["mim_mask"].any(axis=1)
    assert both.sum() > 20
    # Two random masks of 8 of 16 patches agree with probability 1 / C(16, 8) = 1 / 12870.
    same = (first["mim_mask"][both] == second["mim_mask"][both]).all(axis=1)
    assert same.sum() == 0, f"{same.sum()} of {both.sum()} images kept their mask in the second epoch"


def test_masked_share_holds_per_epoch_and_the_unmasked_images_change(two_epochs):
    unmasked = [~e["mim_mask"].any(axis=1) for e in two_epochs]
    for u in unmasked:  # masked_image_fraction=0.5 of 200 visits: 100 +- 7 (1 sd)
        assert 0.4 < 1 - u.mean() < 0.6
    # Independent draws per visit: ~1/4 of the records are unmasked in both epochs (per record: 1/2, all of them).
    both = (unmasked[0] & unmasked[1]).sum()
    assert 30 < both < 70, (both, unmasked[0].sum())


def test_caption_choice_changes_across_epochs(two_epochs):
    first, second = two_epochs
    changed = (first["caption"] != second["caption"]).mean()
    assert 0.35 < changed < 0.65  # independent fair coins differ half the time (per record: never)


def test_one_and_two_processes_draw_the_same_for_each_global_example():
    batches = 3
    whole = concat(stream(TrainStreamSpec(8, seed=1)), batches)
    halves = [stream(TrainStreamSpec(8, seed=1, process_index=i, process_count=2)) for i in range(2)]
    for step in range(batches):  # process i holds global positions i, i + 2, ... of the global batch
        parts = [next(h) for h in halves]
        for key in ("index", "mim_mask", "caption"):
            interleaved = np.empty_like(whole[key][step * 8:(step + 1) * 8])
            interleaved[0::2], interleaved[1::2] = parts[0][key], parts[1][key]
            np.testing.assert_array_equal(interleaved, whole[key][step * 8:(step + 1) * 8], err_msg=key)


def test_grain_workers_draw_the_same_as_the_training_process():
    from absl import flags

    if not flags.FLAGS.is_parsed():  # grain's worker processes read absl flags
        flags.FLAGS.mark_as_parsed()
    spec = TrainStreamSpec(8, seed=2)
    inline = concat(stream(spec), 4)
    workers = stream(dataclasses.replace(spec, worker_count=2))
    with_workers = concat(workers, 4)
    workers.close()
    for key in ("index", "mim_mask", "caption"):
        np.testing.assert_array_equal(with_workers[key], inline[key], err_msg=key)


def test_random_crops_are_per_visit_and_the_same_for_any_process_count(tmp_path):
    shards = write_record_shards(tmp_path / "shards", 16, size=(40, 48))
    source = [SourceStream(make_source(shards, "train", 32), 1.0, RandomResizedCrop(32, (0.3, 1.0), True))]
    whole = concat(stream(TrainStreamSpec(8, seed=0), source), 4)  # two epochs of 16 records
    halves = [concat(stream(TrainStreamSpec(8, seed=0, process_index=i, process_count=2), source), 4)
              for i in range(2)]
    for i in range(2):
        for key in ("index", "image", "mim_mask"):
            np.testing.assert_array_equal(halves[i][key], whole[key][i::2], err_msg=key)
    first, second = (np.argsort(whole["index"][e * 16:(e + 1) * 16]) + e * 16 for e in range(2))
    assert np.array_equal(whole["index"][first], whole["index"][second])
    differs = [not np.array_equal(a, b) for a, b in zip(whole["image"][first], whole["image"][second], strict=True)]
    assert sum(differs) == 16  # every image is cropped afresh in the second epoch
