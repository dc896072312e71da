"""EVA: the targets are the teacher's patch tokens in CLIP's aligned space (ln_post, then the image projection), the
loss starts near 0 and the teacher gets no gradient; the teacher is the run's reference model (config.reference),
loaded sharded like the student; the checkpoints leave it out (its fingerprint only), a resume from the saved config
reloads it (tests/test_mim_resume.py: exactly as an uninterrupted run), and the run is evaluated and exported after
the teacher is deleted; patch dropout is rejected; 2 processes train like 1."""

import json
import shutil
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, tiny_config
from test_distributed import LAUNCHER, clean_env, compile_cache, run, train_losses  # noqa: F401

from vlp import config as vlp_config
from vlp.parallel import sharding
from vlp.train import frozen, trainer
from vlp.train.checkpoint import Checkpointer
from vlp.train.metrics import read_jsonl

SHRINK = {"model.image.width": 32, "model.image.depth": 1, "model.image.mlp_dim": 64, "model.image.num_heads": 2,
          "batch_size": 16, "log_every": 1, "checkpoint_every": 2, "optim.warmup_steps": 0, "mim.min_block": 2,
          "optim.schedule": "constant",  # so a run extended to more steps keeps its learning rates
          "evals.dense.num_examples": 16, "evals.dense.train_examples": 32, "evals.dense.batch_size": 16,
          "async_checkpointing": False, "mesh.num_devices": 1}


def make_teacher(workdir: Path, **updates) -> Path:
    """A clip workdir (config.json + a checkpoint of perturbed init params) whose 4x4-patch tower is the teacher;
    `updates` (dotted keys) change tiny_config (XBT's old and new models differ in seed and width)."""
    config = tiny_config(**updates)
    exp = trainer.build_experiment(config)
    state = exp.init_state()
    # LayerNorm scales/biases of 1/0 would make ln_post a plain standardisation: give them values of their own.
    state = state.replace(params=jax.tree.map(lambda x: x + 0.1 * jnp.sin(jnp.arange(x.size).reshape(x.shape)),
                                              state.params))
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(vlp_config.to_json(config))
    checkpointer = Checkpointer(workdir / "checkpoints", max_to_keep=1, async_save=False)
    checkpointer.save(1, state, None, force=True)
    checkpointer.close()
    return workdir


@pytest.fixture(scope="module")
def teacher_workdir(tmp_path_factory) -> Path:
    return make_teacher(tmp_path_factory.mktemp("eva_teacher") / "clip")


def eva_config(teacher: Path | str, **updates):
    config = vlp_config.load_config_file(str(REPO / "configs" / "eva.py") + ":tiny")
    overrides = {**SHRINK, "total_steps": 4, "reference.path": str(teacher), **updates}
    vlp_config.apply_overrides(config, {k: str(v) for k, v in overrides.items()})
    return config


def teacher_params(teacher: Path):
    exp = trainer.build_experiment(vlp_config.load_json(teacher / "config.json"))
    _, params = trainer.restore_params(teacher, exp.abstract_state.params)
    return jax.device_get(params)


@pytest.fixture(scope="module")
def eva_start(teacher_workdir):
    """An EVA experiment and its initial state as the trainer builds it (fresh start)."""
    exp = trainer.build_experiment(eva_config(teacher_workdir))
    checkpointer = Checkpointer(Path(teacher_workdir).parent / "eva_empty", max_to_keep=1, async_save=False)
    _, state = trainer._initial_state(exp, checkpointer, None)
    checkpointer.close()
    return exp, state


def numpy_layer_norm(x, scale, bias, eps):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * scale + bias


def test_aligned_target_is_ln_post_patch_tokens_through_the_projection(eva_start, teacher_workdir):
    exp, state = eva_start
    teacher = exp.objective.teacher
    params = jax.device_get(state.extra[frozen.REFERENCE_KEY])
    images = np.asarray(jax.random.uniform(jax.random.key(1), (2, 32, 32, 3), minval=-1, maxval=1))
    # Independent reference: the encoder's output tokens (before ln_post), captured from the teacher's ViT.
    _, captured = teacher.model.apply({"params": params}, images, method="encode_image", capture_intermediates=True,
                                      mutable=["intermediates"])
    encoder_out = np.asarray(captured["intermediates"]["image"]["encoder"]["__call__"][0])[:, 1:]  # CLS dropped
    ln = params["image"]["ln_post"]
    want = numpy_layer_norm(encoder_out, np.asarray(ln["scale"]), np.asarray(ln["bias"]), 1e-5)
    want = want @ np.asarray(params["image_proj"]["kernel"])
    got = np.asarray(exp.objective.targets(params, images))
    assert got.shape == (2, 16, 32)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert np.abs(got - encoder_out).max() > 0.1  # not the raw tokens
    # The named option keeps the pre-projection tokens (after ln_post).
    raw = exp.objective.teacher.encode_patches(params, images)
    np.testing.assert_allclose(np.asarray(raw), numpy_layer_norm(encoder_out, np.asarray(ln["scale"]),
                                                                 np.asarray(ln["bias"]), 1e-5), rtol=1e-4, atol=1e-5)


def test_teacher_restored_sharded_like_the_student_and_gets_no_gradient(teacher_workdir):
    config = eva_config(teacher_workdir, **{"mesh.shape": "(1, 2, 1)", "mesh.num_devices": 2})
    exp = trainer.build_experiment(config)
    checkpointer = Checkpointer(Path(teacher_workdir).parent / "eva_empty_fsdp", max_to_keep=1, async_save=False)
    _, state = trainer._initial_state(exp, checkpointer, None)
    checkpointer.close()
    restored = state.extra[frozen.REFERENCE_KEY]
    want = teacher_params(teacher_workdir)
    assert jax.tree.all(jax.tree.map(lambda a, b: np.array_equal(np.asarray(a), b), restored, want))
    kernel = restored["image"]["encoder"]["block_0"]["mlp"]["fc1"]["kernel"]
    student = state.params["image"]["encoder"]["block_0"]["mlp"]["fc1"]["kernel"]
    assert kernel.sharding == student.sharding and not kernel.sharding.is_fully_replicated
    # Sanity (methods.md section 8): -1 < loss ~ 0 at init; no gradient reaches the teacher.
    batch = next(trainer.make_train_iterator(config, exp.objective))
    with exp.context():
        batch = sharding.host_to_global(batch, exp.mesh)

        def loss_fn(params, teacher, extra):  # the teacher as an argument of its own (the fingerprint is integer)
            extra = dict(extra, **{frozen.REFERENCE_KEY: teacher})
            return exp.objective.loss_fn_with_extra(params, extra, batch, jax.random.key(0), jnp.int32(0))[0]

        grad_fn = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1)))
        loss, (grads_student, grads_teacher) = grad_fn(state.params, state.extra[frozen.REFERENCE_KEY], state.extra)
    assert -1.0 < float(loss) and abs(float(loss)) < 0.2
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads_teacher)) == 0.0
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads_student)) > 0.0


def test_resume_reloads_the_teacher_and_eval_and_export_need_none(tmp_path, teacher_workdir):
    teacher = shutil.copytree(teacher_workdir, tmp_path / "teacher")
    run_dir = tmp_path / "eva"
    trainer.train_and_evaluate(eva_config(teacher), run_dir)
    saved = json.loads((run_dir / "config.json").read_text())
    assert json.loads(saved["reference"]["config"])["objective"] == "clip"
    # The checkpoints hold the teacher's fingerprint only, not its params.
    reader = Checkpointer(run_dir / "checkpoints", max_to_keep=3, async_save=False)._params_reader
    assert set(reader.metadata(run_dir / "checkpoints" / "4" / "state").tree["extra"]) == {frozen.FINGERPRINT_KEY}
    # (a) extend the run from its saved config (as `--config=configs/workdir.py:<workdir>` does): the teacher is
    # loaded again from the recorded reference.path (tests/test_mim_resume.py checks the losses equal an
    # uninterrupted run's).
    config = vlp_config.load_config_file(f"{REPO / 'configs' / 'workdir.py'}:{run_dir},total_steps=6")
    final = trainer.train_and_evaluate(config, run_dir)
    assert final["resumed_from_step"] == 4 and sorted(train_losses(run_dir)) == list(range(1, 7))
    # (b) the tools need only the run's workdir (the student's params).
    shutil.rmtree(teacher)
    sys.path.insert(0, str(REPO / "tools"))
    import eval as eval_tool
    import export as export_tool

    record = eval_tool.main([f"--workdir={run_dir}", "--set", "evals.dense.num_examples=16"])
    assert record["step"] == 6 and 0.0 <= record["dense_miou"] <= 1.0
    weights = export_tool.main([f"--workdir={run_dir}", "--format=safetensors", f"--out={tmp_path / 'export'}"])
    assert weights.is_file()


def test_a_run_without_its_teacher_says_what_is_missing(tmp_path, teacher_workdir):
    with pytest.raises(ValueError, match=r"reference.path='.*gone' is not a directory"):
        trainer.build_experiment(eva_config(tmp_path / "gone"))
    with pytest.raises(ValueError, match=r"objective 'eva' needs a frozen reference model: set reference.path"):
        trainer.build_experiment(eva_config(""))


EVA_ARGS = [
    "--config=configs/eva.py:tiny", "--config.total_steps=4", "--config.batch_size=16", "--config.log_every=1",
    "--config.checkpoint_every=1000", "--config.optim.warmup_steps=0", "--config.mim.min_block=2",
    "--config.mesh.shape=(2,2,1)", "--config.evals.dense.num_examples=16", "--config.evals.dense.train_examples=32",
    "--config.evals.dense.batch_size=16",
    *(f"--config.model.image.{key}={value}" for key, value in (("width", 32), ("depth", 1), ("mlp_dim", 64),
                                                                  ("num_heads", 2))),
]


def test_two_processes_train_eva_like_one_process(tmp_path, teacher_workdir, compile_cache):
    args = [*EVA_ARGS, f"--config.reference.path={teacher_workdir}"]
    one, two = tmp_path / "one", tmp_path / "two"
    run([sys.executable, "-m", "vlp.train", f"--workdir={one}", *args], clean_env(compile_cache, 4), 240)
    run(["bash", str(LAUNCHER), "2", f"--workdir={two}", *args], clean_env(compile_cache, 2), 240)
    expected, got = train_losses(one), train_losses(two)
    assert sorted(got) == sorted(expected) == [1, 2, 3, 4]
    for step in expected:
        assert abs(got[step] - expected[step]) <= 1e-5 * abs(expected[step]), (step, got[step], expected[step])
    assert [r for r in read_jsonl(two / "metrics.jsonl") if "dense_miou" in r]


def test_patch_dropout_is_rejected(teacher_workdir):
    # EVA's student reads masked patch grids (the mask is the method); FLIP patch dropout is for two-tower students.
    with pytest.raises(ValueError, match=r"model.image.patch_dropout=0.5 is not supported by objective 'eva'"):
        trainer.build_experiment(eva_config(teacher_workdir, **{"model.image.patch_dropout": 0.5}))


def test_an_unknown_target_space_is_rejected(teacher_workdir):
    config = eva_config(teacher_workdir, **{"mim.teacher_features": "cls"})
    with pytest.raises(ValueError, match=r"mim.teacher_features='cls'; valid: \('aligned', 'patch_tokens'\)"):
        vlp_config.validate(config)
