"""Restore under faults: a transient read error is retried, and if it persists stops the run without moving any
checkpoint; real damage (classified from what orbax / tensorstore really raise) falls back to the previous step;
fresh_start begins a new data stream. (Two processes agreeing on one step: tests/test_distributed.py.)"""

import errno
import json
import shutil

import orbax.checkpoint as ocp
import pytest
from conftest import tiny_config

from vlp.train.checkpoint import Checkpointer, is_damage
from vlp.train.metrics import read_jsonl
from vlp.train.trainer import build_experiment, train_and_evaluate


def config(**updates):
    return tiny_config(**{"checkpoint_every": 4, "keep_checkpoints": 3, "evals.zeroshot.num_examples": 32,
                          "evals.retrieval.num_examples": 32, **updates})


def losses(workdir):
    return {r["step"]: r["loss"] for r in read_jsonl(workdir / "metrics.jsonl") if "loss" in r}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """8 steps with checkpoints 4 and 8; copied by each test that changes it."""
    workdir = tmp_path_factory.mktemp("finished")
    train_and_evaluate(config(), workdir)
    return workdir


def copy_run(source, target):
    shutil.copytree(source / "checkpoints", target / "checkpoints")
    return target


def step_dirs(workdir):
    return sorted(p.name for p in (workdir / "checkpoints").iterdir())


# What a damaged step looks like on disk; each is what a crash, a bad disk or a stray edit leaves behind.
def truncate_arrays(step_dir):
    for path in (step_dir / "state").rglob("*"):
        if path.is_file() and "/d/" in str(path):
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def delete_arrays(step_dir):
    for path in (step_dir / "state").rglob("*"):
        if path.is_file() and "/d/" in str(path):
            path.unlink()


def garble_metadata(step_dir):
    (step_dir / "state" / "_METADATA").write_text("{garbled")


def garble_data_position(step_dir):
    (step_dir / "data" / "process_0-of-1.json").write_text("{garbled")


def delete_data_position(step_dir):
    (step_dir / "data" / "process_0-of-1.json").unlink()


@pytest.mark.parametrize("damage", [truncate_arrays, delete_arrays, garble_metadata, garble_data_position,
                                    delete_data_position])
def test_real_damage_is_classified_as_damage(tmp_path, finished_run, damage):
    damage(copy_run(finished_run, tmp_path) / "checkpoints" / "8")
    checkpointer = Checkpointer(tmp_path / "checkpoints", max_to_keep=3, async_save=False, read_attempts=1)
    try:
        reader = checkpointer._train_state_reader(build_experiment(config()).abstract_state, with_data=True)
        state, error = checkpointer._read(8, reader)
    finally:
        checkpointer.close()
    assert state is None and error is not None
    assert is_damage(error), f"{type(error).__name__}: {error}"


@pytest.mark.parametrize("error, damage", [
    (OSError(errno.EIO, "Input/output error"), False),
    (OSError(errno.ETIMEDOUT, "Connection timed out"), False),
    (TimeoutError("read timed out"), False),
    (MemoryError(), False),
    (RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1.0GiB"), False),
    # tensorstore's form of a failed system call: the errno decides (EIO -> absl UNKNOWN, ENOENT -> NOT_FOUND)
    (ValueError('UNKNOWN: Error reading "params.w/.zarray" [OS error 5: Input/output error]'), False),
    (ValueError('UNAVAILABLE: Error reading "gs://bucket/ckpt/8/state/manifest.ocdbt": HTTP 503'), False),
    (ValueError('NOT_FOUND: Error reading "params.w/.zarray" [OS error 2: ENOENT No such file or directory]'), True),
    (ValueError('DATA_LOSS: Error decoding manifest: Encoded length (0) is less than minimum length (16)'), True),
    (json.JSONDecodeError("Expecting value", "{garbled", 1), True),
    (KeyError('Item "state" was not found in the checkpoint'), True),
    (FileNotFoundError(errno.ENOENT, "No such file or directory"), True),
])
def test_transient_errors_are_not_damage(error, damage):
    assert is_damage(error) is damage


@pytest.fixture
def eio_reads(monkeypatch):
    """Makes the next `count[0]` reads of a checkpoint's state fail with EIO, as a flaky mount does."""
    real = ocp.StandardCheckpointHandler.restore
    failures = [0]

    def flaky(self, *args, **kwargs):
        if failures[0] > 0:
            failures[0] -= 1
            raise OSError(errno.EIO, "Input/output error")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(ocp.StandardCheckpointHandler, "restore", flaky)
    return failures


def test_transient_read_error_is_retried_and_restores_the_newest(tmp_path, finished_run, eio_reads):
    copy_run(finished_run, tmp_path)
    eio_reads[0] = 1
    final = train_and_evaluate(config(), tmp_path)
    assert eio_reads[0] == 0  # the failure did happen
    assert final["resumed_from_step"] == 8
    assert step_dirs(tmp_path) == ["4", "8"]  # nothing moved to .corrupt


def test_persistent_transient_error_stops_and_moves_nothing(tmp_path, finished_run, eio_reads):
    copy_run(finished_run, tmp_path)
    eio_reads[0] = 1000
    with pytest.raises(OSError, match=r"could not read checkpoint step 8 .* after 3 tries: OSError: .*Input/output "
                                      r"error.*nothing was moved"):
        # even with fresh_start: an I/O error is not a reason to throw the run's progress away
        train_and_evaluate(config(on_unrestorable_checkpoint="fresh_start"), tmp_path)
    assert step_dirs(tmp_path) == ["4", "8"]
    assert not (tmp_path / "metrics.jsonl").exists()  # it stopped before training


def test_fresh_start_after_unreadable_states_begins_the_data_stream_afresh(tmp_path, finished_run):
    copy_run(finished_run, tmp_path)
    for step in (4, 8):  # the state arrays are damaged, the data positions are fine
        truncate_arrays(tmp_path / "checkpoints" / str(step))
    final = train_and_evaluate(config(on_unrestorable_checkpoint="fresh_start"), tmp_path)
    assert final["resumed_from_step"] == 0
    assert losses(tmp_path) == losses(finished_run)  # exactly a run in a new, empty workdir
    assert step_dirs(tmp_path) == ["4", "4.corrupt", "8", "8.corrupt"]


def test_init_from_skips_a_damaged_newest_checkpoint_and_leaves_the_source_alone(tmp_path, finished_run):
    import jax
    import numpy as np

    from vlp.train.trainer import restore_params

    source = copy_run(finished_run, tmp_path)
    truncate_arrays(source / "checkpoints" / "8")
    abstract = build_experiment(config()).abstract_state
    step, params = restore_params(source, abstract.params)
    checkpointer = Checkpointer(finished_run / "checkpoints", max_to_keep=3, async_save=False)
    try:
        _, expected = checkpointer.restore(abstract, None, 4)
    finally:
        checkpointer.close()
    assert step == 4
    for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(expected.params), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert step_dirs(source) == ["4", "8"]  # another run's workdir: nothing moved
