"""Damaged records are skipped (replaced by a readable record far from them, deterministically) and counted in the
`skipped_bad_records` metric; a long run of them (a damaged shard) does not stop training, too large a share of
them does, naming the shards. Storage errors are retried, never skipped."""

import dataclasses
import errno
import json
import math
import time
from pathlib import Path

import grain
import numpy as np
import pytest
from conftest import tiny_config
from make_data import write_record_shards
from PIL import UnidentifiedImageError

from vlp.data import sources
from vlp.data.augment import RandomResizedCrop
from vlp.data.pipeline import SkippingReader, SourceStream, TrainStreamSpec, make_train_dataset
from vlp.data.transforms import SKIPPED_KEY
from vlp.train import trainer


class Damaged:
    """A source whose records at `bad` indices (a set or a predicate) raise `error`, like an undecodable image."""

    def __init__(self, source, bad, error=ValueError):
        self.source, self.error = source, error
        self.is_bad = bad if callable(bad) else set(bad).__contains__
        self.reads = 0

    def __len__(self):
        return len(self.source)

    def __getitem__(self, index):
        self.reads += 1
        if self.is_bad(index):
            raise self.error(f"cannot decode image of record {index}")
        return self.source[index]


class Flaky:
    """A source whose record `index` fails with a storage error (EIO) on its first `failures` reads."""

    def __init__(self, source, index, failures, code=errno.EIO):
        self.source, self.index, self.failures, self.code = source, index, failures, code
        self.reads = 0

    def __len__(self):
        return len(self.source)

    def __getitem__(self, index):
        if index == self.index:
            self.reads += 1
            if self.reads <= self.failures:
                raise OSError(self.code, f"storage hiccup reading record {index}")
        return self.source[index]


@pytest.fixture(scope="module")
def shapes():
    return sources.make_source("shapes", "validation", 32)  # 10,000 records


def test_stride_jumps_far_and_reaches_every_record(shapes):
    stride = SkippingReader(shapes).stride
    n = len(shapes)
    assert math.gcd(stride, n) == 1 and abs(stride - n * 0.618) < 5  # coprime, ~n / golden ratio
    assert len({(5 + k * stride) % n for k in range(n)}) == n


def test_damaged_records_are_replaced_and_counted(shapes):
    stride, n = SkippingReader(shapes).stride, len(shapes)
    second = (5 + stride) % n
    reader = SkippingReader(Damaged(shapes, bad={5, 6, second}))
    assert reader[4][SKIPPED_KEY] == 0 and reader[4]["label"] == shapes[4]["label"]
    record = reader[6]  # 6 is damaged: the record one stride on stands in
    assert record[SKIPPED_KEY] == 1 and record["index"] == (6 + stride) % n
    record = reader[5]  # 5 and its first replacement are damaged: the second one stands in
    assert record[SKIPPED_KEY] == 2 and record["index"] == (5 + 2 * stride) % n
    assert record["label"] == shapes[(5 + 2 * stride) % n]["label"]


def test_decode_errors_that_are_oserrors_are_damage_not_retried(shapes):
    source = Damaged(shapes, bad={5}, error=UnidentifiedImageError)  # PIL's: an OSError without an errno
    record = SkippingReader(source)[5]
    assert record[SKIPPED_KEY] == 1 and source.reads == 2  # one read of 5, one of its replacement


def test_a_long_run_of_damaged_records_does_not_stop_reading(shapes):
    # 150 damaged records in a row (1.5% of the source), read in order from before to after them.
    reader = SkippingReader(Damaged(shapes, bad=range(1000, 1150)))
    skipped = np.asarray([reader[i][SKIPPED_KEY] for i in range(900, 1300)])
    np.testing.assert_array_equal(skipped, [1 if 1000 <= i < 1150 else 0 for i in range(900, 1300)])


def test_too_large_a_share_of_damage_stops_and_names_the_shard(tmp_path):
    spec = write_record_shards(tmp_path / "shards", 64, corrupt=range(16, 32))  # shard 1 of 4: all garbage
    shard_file = json.loads((tmp_path / "shards" / "manifest.json").read_text())["splits"]["train"]["shards"][1]
    reader = SkippingReader(sources.make_source(spec, "train", 32), max_bad_share=0.1, bad_window=40)
    # In order: 16 good reads, then per damaged record one bad read + one good replacement (one stride away, in
    # shard 2 or 3). The 5th bad read is the first beyond 10% of 40 reads: 5 bad of 16 + 4 * 2 + 1 = 25 reads.
    for index in range(20):
        assert reader[index][SKIPPED_KEY] == (index >= 16)
    with pytest.raises(RuntimeError) as error:
        reader[20]
    message = str(error.value)
    assert "5 of the last 25 training records read by this process are damaged (20.0%" in message
    assert "the bound is 10.0% of 40 reads" in message
    assert f"{Path(tmp_path / 'shards' / shard_file['file'])}': 5" in message
    assert "not a vlp record" in message  # the decode error itself


def test_a_transient_storage_error_is_retried_not_skipped(shapes, monkeypatch):
    sleeps = []
    monkeypatch.setattr(time, "sleep", sleeps.append)
    source = Flaky(shapes, index=7, failures=2)
    record = SkippingReader(source)[7]
    assert record[SKIPPED_KEY] == 0 and record["index"] == 7 and record["label"] == shapes[7]["label"]
    assert source.reads == 3 and sleeps == [0.25, 0.5]  # exponential backoff


def test_a_persistent_storage_error_stops_the_run(shapes, monkeypatch):
    sleeps = []
    monkeypatch.setattr(time, "sleep", sleeps.append)
    source = Flaky(shapes, index=7, failures=10**9, code=errno.ETIMEDOUT)
    with pytest.raises(RuntimeError, match=r"training record 7 \(in Flaky\) could not be read in 5 tries .*"
                                           r"storage error is not a damaged record"):
        SkippingReader(source)[7]
    assert source.reads == 5 and sleeps == [0.25, 0.5, 1.0, 2.0]


@dataclasses.dataclass
class KeepIndex(grain.transforms.Map):
    def map(self, example):
        return {"index": np.int64(example["index"]), "label": np.int64(example["label"])}


@dataclasses.dataclass
class Identity(grain.transforms.Map):
    def map(self, batch):
        return batch


def test_training_counts_skipped_records(tmp_path, monkeypatch):
    # A mixture of damaged shapes (3 parts; records [100000, 180000) of 1,000,000 are damaged: a run of 80,000)
    # and ArrayRecord shards holding garbage records (1 part, random crops).
    corrupt_in_shards = (3, 4, 20)
    shards = write_record_shards(tmp_path / "shards", 32, corrupt=corrupt_in_shards, label_offset=100)
    bad = lambda index: 100_000 <= index < 180_000  # noqa: E731
    real = sources.make_source
    monkeypatch.setattr(sources, "make_source",
                        lambda name, split, size: Damaged(real(name, split, size), bad)
                        if split == "train" and name == "shapes" else real(name, split, size))
    config = tiny_config(**{"total_steps": 6, "evals.zeroshot.num_examples": 32, "evals.retrieval.num_examples": 32,
                            "data.mixture": f"('shapes=3', '{shards}=1')"})
    # Which records the first 6 batches visit, from the same mixture of intact sources (the shards rewritten whole).
    intact_shards = write_record_shards(tmp_path / "intact", 32, label_offset=100)
    intact = [SourceStream(real("shapes", "train", 32), 3.0),
              SourceStream(real(intact_shards, "train", 32), 1.0, RandomResizedCrop(32, (0.9, 1.0), True))]
    stream = iter(make_train_dataset(intact, KeepIndex(), Identity(), TrainStreamSpec(16, seed=0)))
    visits = [next(stream) for _ in range(6)]
    index = np.concatenate([b["index"] for b in visits])
    from_shards = np.concatenate([b["label"] for b in visits]) >= 100  # shard labels: 100 + i % 5
    hits_shapes = int(sum(bad(i) for i in index[~from_shards]))
    hits_shards = int(sum(i in corrupt_in_shards for i in index[from_shards]))
    assert hits_shapes > 0 and hits_shards > 0
    final = trainer.train_and_evaluate(config, tmp_path / "run")
    assert np.isfinite(final["final_loss"])
    # Each damaged record's replacement (one stride away) is intact, so every visit of one counts one skip.
    for n, damaged in ((1_000_000, range(100_000, 180_000)), (32, corrupt_in_shards)):
        stride = SkippingReader(range(n)).stride
        assert not set(damaged) & {(i + stride) % n for i in damaged}
    assert final["skipped_bad_records"] == hits_shapes + hits_shards
