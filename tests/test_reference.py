"""The frozen reference-model mechanism (config.reference, vlp.train.frozen.Reference), through clip_distill: the
reference is loaded onto the run's mesh sharded like the student, holds no optimizer state and gets no update; the
checkpoints leave it out and keep its fingerprint; a resume reloads it, and refuses a changed one; 2 processes load
and train with it like 1."""

import json
import shutil
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config
from test_distributed import LAUNCHER, clean_env, compile_cache, run, train_losses  # noqa: F401
from test_eva import make_teacher

from vlp import config as vlp_config
from vlp.parallel import sharding
from vlp.train import frozen, trainer
from vlp.train.checkpoint import Checkpointer
from vlp.train.restore import restore_run

STEPS = 2


def distill_config(teacher: Path | str, **updates):
    """The conftest's tiny clip student as clip_distill, its teacher (same shapes) in `teacher`; no evals."""
    config = tiny_config(**{"objective": "clip_distill", "reference.path": str(teacher), "total_steps": STEPS,
                            "checkpoint_every": 1, "optim.warmup_steps": 0, "optim.schedule": "constant",
                            **updates})
    config.evals = {}
    return config


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    return make_teacher(tmp_path_factory.mktemp("reference") / "teacher")


def teacher_params(teacher: Path):
    exp = trainer.build_experiment(vlp_config.load_json(teacher / "config.json"))
    _, params = trainer.restore_params(teacher, exp.abstract_state.params)
    return jax.device_get(params)


def _key_paths(tree) -> list[str]:
    return [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(tree)]


def test_reference_is_sharded_like_the_student_frozen_and_without_optimizer_state(tmp_path, teacher):
    exp = trainer.build_experiment(distill_config(teacher, **{"mesh.shape": "(2, 4, 1)", "mesh.num_devices": -1}))
    checkpointer = Checkpointer(tmp_path / "empty", max_to_keep=1, async_save=False)
    _, state = trainer._initial_state(exp, checkpointer, None)
    checkpointer.close()
    reference = state.extra[frozen.REFERENCE_KEY]
    want = teacher_params(teacher)
    assert jax.tree.all(jax.tree.map(lambda a, b: np.array_equal(np.asarray(a), b), reference, want))
    # Sharded like the student: every leaf has the sharding of the student's leaf at the same path, FSDP-split.
    student_shardings = jax.tree.map(lambda x: x.sharding, state.params)
    assert jax.tree.map(lambda x: x.sharding, reference) == student_shardings
    fc1 = reference["image"]["encoder"]["block_0"]["mlp"]["fc1"]["kernel"]
    assert not fc1.sharding.is_fully_replicated and fc1.sharding.spec[0] == "fsdp"
    # No optimizer state: Adam's moments cover the student's params only.
    assert not [p for p in _key_paths(state.opt_state) if "reference" in p]
    param_count = sum(x.size for x in jax.tree.leaves(state.params))
    moment_count = sum(x.size for x in jax.tree.leaves(state.opt_state) if jnp.issubdtype(x.dtype, jnp.floating))
    assert moment_count == 2 * param_count
    # One step at a non-zero learning rate moves the student and leaves the reference bit for bit.
    before = jax.device_get(state.params)
    step = trainer.jit_train_step(exp)
    with exp.context():
        batch = sharding.host_to_global(next(trainer.make_train_iterator(exp.config, exp.objective)), exp.mesh)
        state, metrics = step(state, batch)
    assert float(metrics["lr"]) > 0 and float(metrics["loss_distill"]) > 0
    assert jax.tree.all(jax.tree.map(lambda a, b: np.array_equal(np.asarray(a), b),
                                     state.extra[frozen.REFERENCE_KEY], want))
    moved = [float(np.abs(np.asarray(a) - b).max()) for a, b in zip(jax.tree.leaves(state.params),
                                                                      jax.tree.leaves(before))]
    assert min(moved) >= 0 and np.mean([m > 0 for m in moved]) > 0.9


def run_config(teacher: Path, steps: int):
    return distill_config(teacher, total_steps=steps, **{"mesh.shape": "(2, 2, 1)", "mesh.num_devices": 4})


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory, teacher):
    """A clip_distill run (1 process, 4 devices, mesh 2x2x1) against a copy of the teacher, stopped after step 1
    and resumed to STEPS: (workdir, the teacher copy, the resumed run's final metrics)."""
    root = tmp_path_factory.mktemp("distill_run")
    copy = Path(shutil.copytree(teacher, root / "teacher"))
    trainer.train_and_evaluate(run_config(copy, 1), root / "run")
    final = trainer.train_and_evaluate(run_config(copy, STEPS), root / "run")
    return root / "run", copy, final


def test_checkpoints_leave_the_reference_out_and_keep_its_fingerprint(one_process_run):
    workdir, teacher, _ = one_process_run
    reader = Checkpointer(workdir / "checkpoints", max_to_keep=3, async_save=False)._params_reader
    state_dir = workdir / "checkpoints" / str(STEPS) / "state"
    assert set(reader.metadata(state_dir).tree["extra"]) == {frozen.FINGERPRINT_KEY}
    saved = json.loads((workdir / "config.json").read_text())
    assert json.loads(saved["reference"]["config"])["model"]["image"]["width"] == 32  # evaluation needs no teacher
    # The checkpointed fingerprint is the sha256 of the teacher's config.json and checkpoint files.
    root, files = frozen._reference_files("vlp", str(teacher), 1)
    assert [f.name for f in files][0] == "config.json" and len(files) > 2
    assert np.array_equal(np.asarray(reader.restore(state_dir)["extra"][frozen.FINGERPRINT_KEY]),
                          frozen.fingerprint_words(frozen.fingerprint_files(root, files)))
    # The tools (eval, export, embed) restore the run without its reference.
    _, step, state = restore_run(workdir)
    assert step == STEPS and set(state.extra) == {frozen.FINGERPRINT_KEY}


def test_resume_reloads_the_reference_and_refuses_a_changed_one(one_process_run):
    workdir, teacher, final = one_process_run
    assert final["resumed_from_step"] == 1  # resumed against the same teacher (the 2-process test checks its losses)
    # The teacher trains on (a newer checkpoint): the run must not go on against another model.
    exp = trainer.build_experiment(vlp_config.load_json(teacher / "config.json"))
    checkpointer = Checkpointer(teacher / "checkpoints", max_to_keep=3, async_save=False)
    _, state = checkpointer.restore(exp.abstract_state)
    checkpointer.save(2, state.replace(params=jax.tree.map(lambda x: x * 1.01, state.params)), None, force=True)
    checkpointer.close()
    with pytest.raises(frozen.ReferenceMismatchError, match=r"reference.path='.*teacher' \(vlp\) is not the "
                                                            r"reference model this run was trained against"):
        trainer.train_and_evaluate(run_config(teacher, STEPS + 1), workdir)


def test_a_run_without_reference_path_says_what_is_missing():
    with pytest.raises(ValueError, match=r"objective 'clip_distill' needs a frozen reference model: set "
                                         r"reference.path"):
        trainer.build_experiment(distill_config(""))


DISTILL_ARGS = ["--config=configs/distill.py:tiny", f"--config.total_steps={STEPS}", "--config.batch_size=16",
                "--config.log_every=1", "--config.checkpoint_every=1", "--config.optim.warmup_steps=0",
                "--config.optim.schedule=constant", "--config.mesh.shape=(2,2,1)", "--config.evals={}",
                *(f"--config.model.{tower}.{key}={value}" for tower in ("image", "text")
                  for key, value in (("width", 32), ("depth", 1), ("mlp_dim", 64), ("num_heads", 2))),
                "--config.model.embed_dim=32"]


def test_two_processes_load_the_reference_and_train_like_one_resumed_process(tmp_path, teacher, one_process_run,
                                                                           compile_cache):
    two = tmp_path / "two"
    run(["bash", str(LAUNCHER), "2", f"--workdir={two}", *DISTILL_ARGS, f"--config.reference.path={teacher}"],
        clean_env(compile_cache, 2), 240)
    got, want = train_losses(two), train_losses(one_process_run[0])
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
    for step in want:
        assert abs(got[step] - want[step]) <= 1e-5 * abs(want[step]), (step, got[step], want[step])


def test_a_safetensors_export_loads_as_the_reference_with_its_own_config(tmp_path, teacher):
    from vlp.export.safetensors_io import save_safetensors

    config = vlp_config.load_json(teacher / "config.json")
    exp = trainer.build_experiment(config)
    want = teacher_params(teacher)
    save_safetensors(want, exp.objective.model_config(), tmp_path / "export")
    # The student is narrower than the exported teacher: the reference is built from the export's model config.
    run = distill_config(tmp_path / "export", **{"reference.format": "safetensors", "model.image.width": 16,
                                                 "model.text.width": 16, "model.embed_dim": 16})
    reference = frozen.Reference(run)
    assert reference.config.model.image.width == 32 and json.loads(run.reference.config)["model"]["embed_dim"] == 32
    mesh = jax.make_mesh((1, 1, 1), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3,
                         devices=jax.devices()[:1])
    shapes = frozen.abstract_params(reference.objective, mesh, sharding.as_rules(run.sharding_rules))
    params, digest = reference.load(jax.tree.map(lambda x: x.sharding, shapes))
    assert jax.tree.all(jax.tree.map(lambda a, b: np.array_equal(np.asarray(a), b), params, want))
    files = frozen._reference_files("safetensors", str(tmp_path / "export"), None)[1]
    assert sorted(f.name for f in files) == ["model.safetensors", "model_config.json"]
    assert digest == frozen.fingerprint_files(tmp_path / "export", files)
