"""Checkpoint faults and moves: a full disk while saving keeps every saved checkpoint and stops or goes on per
config; a checkpoint resumes onto another mesh (orbax reshards); `init_from` starts a run from another run's params."""

import errno

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import tiny_config

from vlp.train.checkpoint import CheckpointWriteError
from vlp.train.metrics import read_jsonl
from vlp.train.restore import restore_run
from vlp.train.trainer import build_experiment, restore_params, train_and_evaluate


def small(**updates):
    return tiny_config(**{"checkpoint_every": 3, "evals.zeroshot.num_examples": 32,
                          "evals.retrieval.num_examples": 32, **updates})


@pytest.fixture
def disk_full_at_step_6(monkeypatch):
    """orbax's array handler raises ENOSPC while writing step 6 (what a full disk does), as for real mid-save."""
    real = ocp.StandardCheckpointHandler.async_save

    def failing(self, directory, *args, **kwargs):
        if "/6.orbax-checkpoint-tmp" in str(directory):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, directory, *args, **kwargs)

    monkeypatch.setattr(ocp.StandardCheckpointHandler, "async_save", failing)


def test_full_disk_stops_clearly_and_keeps_the_previous_checkpoint(tmp_path, disk_full_at_step_6):
    with pytest.raises(CheckpointWriteError, match=r"checkpoint of step 6 .*No space left on device.*newest "
                                                   r"complete checkpoint is step 3"):
        train_and_evaluate(small(), tmp_path)
    steps = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == ["3"]
    _, step, state = restore_run(tmp_path)  # the previous checkpoint is intact
    assert step == 3 and int(state.step) == 3


def test_full_disk_with_continue_retries_at_the_next_checkpoint(tmp_path, disk_full_at_step_6):
    final = train_and_evaluate(small(on_checkpoint_error="continue"), tmp_path)
    assert final["failed_checkpoint_saves"] == 1 and final["steps"] == 8
    steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [3, 8]


@pytest.fixture(scope="module")
def one_device_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("one_device")
    train_and_evaluate(tiny_config(**{"checkpoint_every": 4, "evals.zeroshot.num_examples": 32,
                                      "evals.retrieval.num_examples": 32}), workdir)
    return workdir


def test_resume_onto_another_mesh_continues_the_run(tmp_path, one_device_run):
    import shutil

    shutil.copytree(one_device_run / "checkpoints" / "4", tmp_path / "checkpoints" / "4")
    config = tiny_config(**{"checkpoint_every": 4, "mesh.shape": "(2, 4, 1)", "mesh.num_devices": -1,
                            "evals.zeroshot.num_examples": 32, "evals.retrieval.num_examples": 32})
    final = train_and_evaluate(config, tmp_path)
    assert final["resumed_from_step"] == 4
    expected = {r["step"]: r["loss"] for r in read_jsonl(one_device_run / "metrics.jsonl") if "loss" in r}
    got = {r["step"]: r["loss"] for r in read_jsonl(tmp_path / "metrics.jsonl") if "loss" in r}
    assert sorted(got) == [5, 6, 7, 8]
    for step in got:  # same data and state; only the reduction order of 8 devices differs
        assert abs(got[step] - expected[step]) <= 1e-4 * abs(expected[step])


def test_init_from_loads_params_only_onto_a_new_mesh(tmp_path, one_device_run):
    _, _, trained = restore_run(one_device_run)
    config = tiny_config(**{"init_from.path": str(one_device_run), "mesh.shape": "(1, 8, 1)", "mesh.num_devices": -1})
    exp = build_experiment(config)
    step, params = restore_params(config.init_from.path, exp.abstract_state.params)
    assert step == 8
    for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(trained.params)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert any(not leaf.sharding.is_fully_replicated for leaf in jax.tree.leaves(params))  # resharded (FSDP)
    final = train_and_evaluate(tiny_config(**{"init_from.path": str(one_device_run), "total_steps": 3,
                                              "optim.warmup_steps": 1, "evals.zeroshot.num_examples": 32,
                                              "evals.retrieval.num_examples": 32}), tmp_path)
    assert final["resumed_from_step"] == 0  # a new run: step 0, fresh optimizer state
    first = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if "loss" in r][0]
    fresh = [r for r in read_jsonl(one_device_run / "metrics.jsonl") if "loss" in r][0]
    assert first["loss"] < fresh["loss"]  # starts from the trained params, not from scratch


def test_init_from_a_missing_directory_fails_at_start(tmp_path):
    with pytest.raises(ValueError, match=r"init_from.path='.*nothing' is not a directory"):
        build_experiment(tiny_config(**{"init_from.path": str(tmp_path / "nothing")}))


def test_another_process_count_is_a_clear_error_not_a_corrupt_checkpoint(tmp_path, one_device_run):
    import shutil

    step_dir = tmp_path / "checkpoints" / "4"
    shutil.copytree(one_device_run / "checkpoints" / "4", step_dir)
    state_file = step_dir / "data" / "process_0-of-1.json"
    for rank in range(2):  # as if 2 processes had written it
        shutil.copy(state_file, step_dir / "data" / f"process_{rank}-of-2.json")
    state_file.unlink()
    with pytest.raises(RuntimeError, match=r"written by 2 process\(es\) and this run has 1.*init_from.path="):
        train_and_evaluate(small(), tmp_path)
    assert step_dir.is_dir() and not (tmp_path / "checkpoints" / "4.corrupt").exists()
