"""Unreadable records are skipped (replaced by the next readable one, deterministically) and counted in the
`skipped_bad_records` metric; the run never crashes on them and the batches stay full."""

import numpy as np
import pytest
from conftest import tiny_config
from make_data import write_record_shards

from vlp.data import sources
from vlp.data.augment import RandomResizedCrop
from vlp.data.pipeline import SkippingReader, SourceStream, TrainStreamSpec, make_train_dataset
from vlp.data.transforms import SKIPPED_KEY, SelectCaption, TokenizeBatch
from vlp.data.tokenizer import Tokenizer
from vlp.train import trainer


class Damaged:
    """A source whose records at `bad` indices (a set or a predicate) raise, like an undecodable image."""

    def __init__(self, source, bad):
        self.source = source
        self.is_bad = bad if callable(bad) else set(bad).__contains__

    def __len__(self):
        return len(self.source)

    def __getitem__(self, index):
        if self.is_bad(index):
            raise ValueError(f"cannot decode image of record {index}")
        return self.source[index]


def test_unreadable_records_are_replaced_and_counted():
    reader = SkippingReader(Damaged(sources.make_source("shapes", "train", 32), bad={5, 6, 9}))
    assert reader[4][SKIPPED_KEY] == 0
    record = reader[5]  # 5 and 6 are unreadable: record 7 stands in, two skips counted
    assert record[SKIPPED_KEY] == 2 and record["label"] == sources.make_source("shapes", "train", 32)[7]["label"]
    with pytest.raises(RuntimeError, match="consecutive training records are unreadable"):
        SkippingReader(Damaged(sources.make_source("shapes", "validation", 32), bad=range(100)))[0]


def test_training_counts_skipped_records(tmp_path, monkeypatch):
    # A mixture of damaged shapes (3 parts) and ArrayRecord shards holding garbage records (1 part, random crops).
    shards = write_record_shards(tmp_path / "shards", 32, corrupt=(3, 4, 20), label_offset=100)
    bad = lambda index: index % 13 == 0  # noqa: E731 - about 8% of the records
    real = sources.make_source
    monkeypatch.setattr(sources, "make_source",
                        lambda name, split, size: Damaged(real(name, split, size), bad)
                        if split == "train" and name == "shapes" else real(name, split, size))
    config = tiny_config(**{"total_steps": 6, "evals.zeroshot.num_examples": 32, "evals.retrieval.num_examples": 32,
                            "data.mixture": f"('shapes=3', '{shards}=1')"})
    # What the first 6 batches of the stream skip, read directly from the pipeline.
    streams = [SourceStream(sources.make_source("shapes", "train", 32), 3.0),
               SourceStream(sources.make_source(shards, "train", 32), 1.0, RandomResizedCrop(32, (0.9, 1.0), True))]
    stream = iter(make_train_dataset(streams, SelectCaption("both", 0, 0.75), TokenizeBatch(Tokenizer(None), 12),
                                     TrainStreamSpec(16, seed=0)))
    batches = [next(stream) for _ in range(6)]
    expected = int(sum(b[SKIPPED_KEY].sum() for b in batches))
    from_shards = int(sum(b[SKIPPED_KEY][b["label"] >= 100].sum() for b in batches))  # shard labels: 100 + i % 5
    assert expected > from_shards > 0 and all(len(b["label"]) == 16 for b in batches)
    final = trainer.train_and_evaluate(config, tmp_path / "run")
    assert final["skipped_bad_records"] == expected
    assert np.isfinite(final["final_loss"])
