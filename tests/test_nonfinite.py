"""A NaN batch never updates the params; nan_policy decides what the run does: skip (count it and go on), stop
(raise naming the step and the term, after a debug dump) or rollback (back to the newest checkpoint, skipping the
data since then)."""

import json

import jax
import numpy as np
import pytest
from conftest import tiny_config

from vlp.data.transforms import SKIPPED_KEY
from vlp.parallel import sharding
from vlp.train import trainer
from vlp.train.metrics import read_jsonl
from vlp.train.trainer import NonFiniteLossError, build_experiment, jit_train_step, train_and_evaluate

NAN_BATCH = 5  # the 5th batch of the stream (step 5) has NaN images


def test_nan_batch_is_not_applied_and_is_counted():
    exp = build_experiment(tiny_config())
    state = exp.init_state()
    step = jit_train_step(exp)
    batch = exp.objective.example_batch(16)
    batch["image"][:] = np.nan
    before = jax.device_get(state.params)
    with exp.context():
        new_state, metrics = step(state, sharding.host_to_global(batch, exp.mesh))
    assert int(metrics["nonfinite"]) == 1 and not np.isfinite(float(metrics["loss"]))
    assert int(new_state.step) == 1  # the step is counted, so the data stream moves on
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(jax.device_get(new_state.params))):
        np.testing.assert_array_equal(a, b)


class Crash(RuntimeError):
    """A process that dies mid-run (after some checkpoints, before the next)."""


class PoisonedStream:
    """The real (checkpointable) data iterator, with NaN images in the batches numbered `bad` (an int, a set or a
    predicate; 1 = the first batch drawn), extra skipped-record counts ({batch number: count}) and a crash when
    batch `crash_at` is drawn; counts the batches drawn."""

    def __init__(self, inner, bad, skipped_records=None, crash_at=None):
        self.inner, self.drawn = inner, 0
        self.is_bad = bad if callable(bad) else ({bad} if isinstance(bad, int) else set(bad)).__contains__
        self.skipped_records, self.crash_at = skipped_records or {}, crash_at

    def __iter__(self):
        return self

    def __next__(self):
        self.drawn += 1
        if self.drawn == self.crash_at:
            raise Crash(f"killed while drawing batch {self.drawn}")
        batch = dict(next(self.inner))
        if self.is_bad(self.drawn):
            batch["image"] = np.full_like(batch["image"], np.nan)
        if self.drawn in self.skipped_records:  # as if the pipeline had replaced that many unreadable records
            batch[SKIPPED_KEY] = batch[SKIPPED_KEY].copy()
            batch[SKIPPED_KEY][0] += self.skipped_records[self.drawn]
        return batch

    def get_state(self):  # grain's checkpoint handler takes bytes from iterators it does not know
        return json.dumps(self.inner.get_state()).encode()

    def set_state(self, state):
        self.inner.set_state(json.loads(state))

    def start_prefetch(self):  # grain's restore calls it after set_state
        self.inner.start_prefetch()

    def close(self):
        if hasattr(self.inner, "close"):
            self.inner.close()


@pytest.fixture
def poison(monkeypatch):
    """poison(**PoisonedStream kwargs): the trainer's next data iterators are poisoned so; returns the streams."""
    streams = []
    real = trainer.make_train_iterator

    def set_poison(**kwargs):
        def make(config, objective):
            streams.append(PoisonedStream(real(config, objective), **kwargs))
            return streams[-1]

        monkeypatch.setattr(trainer, "make_train_iterator", make)
        return streams

    return set_poison


@pytest.fixture
def poisoned(poison):
    return poison(bad=NAN_BATCH)


def run_config(policy):
    return tiny_config(**{"nan_policy": policy, "checkpoint_every": 3, "evals.zeroshot.num_examples": 32,
                          "evals.retrieval.num_examples": 32})


def test_skip_counts_the_step_and_finishes(tmp_path, poisoned):
    final = train_and_evaluate(run_config("skip"), tmp_path)
    assert final["skipped_nonfinite_steps"] == 1 and final["rollbacks"] == 0
    rows = {r["step"]: r for r in read_jsonl(tmp_path / "metrics.jsonl") if "loss" in r}
    assert rows[4]["skipped_nonfinite_steps"] == 0 and rows[5]["skipped_nonfinite_steps"] == 1
    assert np.isfinite(rows[8]["loss"])


def test_stop_names_the_step_and_term_and_dumps_the_batch(tmp_path, poisoned):
    with pytest.raises(NonFiniteLossError, match=r"at step 5 .*'loss', 'loss_i2t', 'loss_t2i'.*'rollback'"):
        train_and_evaluate(run_config("stop"), tmp_path)
    dump = json.loads((tmp_path / "nonfinite_step_5.json").read_text())
    assert dump["first_nonfinite_step"] == 5 and not np.isfinite(dump["metrics"]["loss"])
    assert dump["last_batch"]["image"]["nonfinite"] == 16 * 32 * 32 * 3
    assert set(dump["last_batch"]) == {"image", "text", "label", "skipped_records"}


def test_rollback_restores_the_checkpoint_and_skips_the_bad_window(tmp_path, poisoned):
    final = train_and_evaluate(run_config("rollback"), tmp_path)
    assert final["rollbacks"] == 1 and final["steps"] == 8
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["rollback_to_step"] for r in rows if "rollback_to_step" in r] == [3.0]
    # Steps 4 and 5 were trained on batches 4-5, rolled back, and trained again on batches 6-7: 8 + 2 batches.
    assert poisoned[0].drawn == 10
    assert all(np.isfinite(r["loss"]) for r in rows if "loss" in r and r["step"] != 5)


def test_rollback_gives_up_after_three_rollbacks_in_a_row(tmp_path, poison):
    """Every batch from the 5th on is poisoned: each rollback (to step 3) meets a non-finite step at once."""
    streams = poison(bad=lambda index: index >= NAN_BATCH)
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss or gradient at step 4 .*; 3 rollbacks in a row "
                                                 r"did not help"):
        train_and_evaluate(run_config("rollback"), tmp_path)
    rows = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if "rollback_to_step" in r]
    assert [(r["rollback_to_step"], r["rollbacks"]) for r in rows] == [(3.0, 1.0), (3.0, 2.0), (3.0, 3.0)]
    assert streams[0].drawn == 8  # batches 1-5, then one batch after each of the 3 rollbacks


def test_rollback_count_in_a_row_resets_when_a_step_recovers(tmp_path, poison):
    """Batches 5, 7, 9, 11 are poisoned: 4 rollbacks in all, but each is followed by a good step, so the run
    finishes."""
    streams = poison(bad={5, 7, 9, 11})
    final = train_and_evaluate(run_config("rollback"), tmp_path)
    assert final["rollbacks"] == 4 and final["steps"] == 8 and final["skipped_nonfinite_steps"] == 0
    assert streams[0].drawn == 16  # 8 steps + 2 abandoned batches per rollback
    assert [r for r in read_jsonl(tmp_path / "metrics.jsonl") if "loss" in r][-1]["rollbacks"] == 4


def test_counters_are_totals_across_a_resume_as_of_the_checkpoint(tmp_path, poison):
    """A run with a non-finite step (batch 2) and skipped records (batches 5 and 7) dies while drawing batch 8; its
    newest checkpoint is step 6. The resumed run reports the totals at step 6 (the records of batch 7 belong to
    the lost steps) in final_metrics.json and in its metrics.jsonl rows."""
    config = run_config("skip")
    poison(bad=2, skipped_records={5: 3, 7: 2}, crash_at=8)
    with pytest.raises(Crash):
        train_and_evaluate(config, tmp_path)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["3", "6"]
    poison(bad=())  # the rerun reads clean data
    final = train_and_evaluate(config, tmp_path)
    assert final["resumed_from_step"] == 6
    assert (final["skipped_nonfinite_steps"], final["skipped_bad_records"]) == (1, 3)
    assert json.loads((tmp_path / "final_metrics.json").read_text())["skipped_bad_records"] == 3
    rows = {r["step"]: r for r in read_jsonl(tmp_path / "metrics.jsonl") if "loss" in r}  # the rerun's rows win
    assert [(rows[s]["skipped_nonfinite_steps"], rows[s]["skipped_bad_records"]) for s in (2, 5, 7, 8)] == [
        (1, 0), (1, 3), (1, 3), (1, 3)]
