"""A NaN batch never updates the params; nan_policy decides what the run does: skip (count it and go on), stop
(raise naming the step and the term, after a debug dump) or rollback (back to the newest checkpoint, skipping the
data since then)."""

import json

import jax
import numpy as np
import pytest
from conftest import tiny_config

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


class PoisonedStream:
    """The real (checkpointable) data iterator, with NaN images in one batch; counts the batches drawn."""

    def __init__(self, inner, bad_index: int):
        self.inner, self.bad_index, self.drawn = inner, bad_index, 0

    def __iter__(self):
        return self

    def __next__(self):
        batch = dict(next(self.inner))
        self.drawn += 1
        if self.drawn == self.bad_index:
            batch["image"] = np.full_like(batch["image"], np.nan)
        return batch

    def get_state(self):  # grain's checkpoint handler takes bytes from iterators it does not know
        return json.dumps(self.inner.get_state()).encode()

    def set_state(self, state):
        self.inner.set_state(json.loads(state))

    def close(self):
        if hasattr(self.inner, "close"):
            self.inner.close()


@pytest.fixture
def poisoned(monkeypatch):
    streams = []
    real = trainer.make_train_iterator

    def make(config, objective):
        streams.append(PoisonedStream(real(config, objective), NAN_BATCH))
        return streams[-1]

    monkeypatch.setattr(trainer, "make_train_iterator", make)
    return streams


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
