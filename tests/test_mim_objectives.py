"""One train step of each masked-image objective (simmim, mae, eva, tips) on a 2x4x1 mesh of 8 devices equals the
1-device step (loss, every gradient leaf, the AdamW update, and TIPS's EMA teacher and centres leaf by leaf); the
batch comes from the real pipeline (masks drawn per example, both captions for TIPS). Also: TIPS's extra state
survives a checkpoint round trip, and image-only objectives reject text evaluators with a clear error."""

import jax
import numpy as np
import pytest
from conftest import REPO, assert_same_update, assert_trees_close, tiny_config

from vlp import config as vlp_config
from vlp.data.transforms import SKIPPED_KEY
from vlp.parallel import sharding
from vlp.train.checkpoint import Checkpointer
from vlp.train.trainer import build_experiment, jit_train_step, make_train_iterator

OBJECTIVES = ("simmim", "mae", "eva", "tips")


@pytest.fixture(scope="module")
def teacher_workdir(tmp_path_factory):
    """A clip workdir (config.json + an initial checkpoint) whose 4x4-patch image tower is EVA's teacher."""
    workdir = tmp_path_factory.mktemp("teacher")
    config = tiny_config()
    exp = build_experiment(config)
    (workdir / "config.json").write_text(vlp_config.to_json(config))
    checkpointer = Checkpointer(workdir / "checkpoints", max_to_keep=1, async_save=False)
    checkpointer.save(1, exp.init_state(), None, force=True)
    checkpointer.close()
    return str(workdir)


def mim_config(name: str, **updates):
    config = vlp_config.load_config_file(str(REPO / "configs" / f"{name}.py") + ":tiny")
    config.model.image.update(width=32, depth=1, mlp_dim=64, num_heads=2, patch_size=8)
    config.model.text.update(width=32, depth=1, mlp_dim=64, num_heads=2)
    config.model.embed_dim = 32
    config.mim.update(decoder_width=32, decoder_heads=2, decoder_mlp_dim=64)
    config.distill.update(num_prototypes=64, head_hidden=32, head_bottleneck=16, head_layers=2,
                          teacher_temp_warmup_steps=4)
    config.mim.min_block = 2
    config.batch_size = 16
    config.total_steps = 8
    config.optim.warmup_steps = 0  # a non-zero learning rate at step 0
    config.mesh.num_devices = 1
    vlp_config.apply_overrides(config, {k: str(v) for k, v in updates.items()})
    return config


def rel_diff(a, b):
    a = np.concatenate([np.ravel(x) for x in jax.tree.leaves(jax.device_get(a))])
    b = np.concatenate([np.ravel(x) for x in jax.tree.leaves(jax.device_get(b))])
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def run_step(name, mesh_shape, num_devices, teacher, batch=None, initial=None):
    updates = {"mesh.shape": str(mesh_shape), "mesh.num_devices": num_devices, "reference.path": teacher}
    exp = build_experiment(mim_config(name, **updates))
    if batch is None:
        batch = next(make_train_iterator(exp.config, exp.objective))
    # Every mesh starts from the very same values (and the sharded run skips its own init).
    state = exp.init_state() if initial is None else jax.device_put(initial, exp.state_shardings)
    step = jit_train_step(exp)
    with exp.context():
        global_batch = sharding.host_to_global(batch, exp.mesh)
        initial_state = jax.device_get(state)
        grads = jax.device_get(step_gradients(exp, state, global_batch))
        new_state, metrics = step(state, global_batch)
    return {"exp": exp, "batch": batch, "initial": initial_state, "state": new_state, "grads": grads,
            "metrics": jax.device_get(metrics), "sharding": global_batch["image"].sharding}


def step_gradients(exp, state, batch):
    """The gradients the first train step takes: its loss (with the extra state for EVA and TIPS), its rng."""
    objective = exp.objective
    batch = {k: v for k, v in batch.items() if k != SKIPPED_KEY}  # pipeline bookkeeping, popped by the step
    rng = jax.random.fold_in(jax.random.key(exp.config.seed), 0)
    if objective.has_extra:
        def loss(params):
            return objective.loss_fn_with_extra(params, state.extra, batch, rng, state.step)[0]
    else:
        def loss(params):
            return objective.loss_fn(params, batch, rng)[0]
    return jax.jit(jax.grad(loss))(state.params)


@pytest.fixture(scope="module", params=OBJECTIVES)
def single(request, teacher_workdir):
    return run_step(request.param, (1, 1, 1), 1, teacher_workdir)


def test_sharded_step_equals_single_device(single, teacher_workdir):
    name = single["exp"].config.objective
    batch = single["batch"]
    assert batch["mim_mask"].shape == (16, 16) and batch["mim_mask"].any()
    sharded = run_step(name, (2, 4, 1), -1, teacher_workdir, batch, single["initial"])
    assert len(sharded["sharding"].device_set) == 8
    for key in ("loss", "grad_norm"):
        want = single["metrics"][key]
        assert abs(sharded["metrics"][key] - want) <= 1e-5 * abs(want), (key, sharded["metrics"][key], want)
    assert np.isfinite(single["metrics"]["loss"]) and single["metrics"]["nonfinite"] == 0
    # Every gradient leaf to rel 1e-5 (measured <= 8e-7; no leaf is zero), then the AdamW update of a step with
    # lr > 0 (measured <= 1.3e-5 for TIPS, 3e-6 for the others).
    assert_trees_close(sharded["grads"], single["grads"], rtol=1e-5)
    assert_same_update(sharded["state"].params, single["state"].params, single["initial"].params,
                       float(single["metrics"]["lr"]), rtol=1e-4)
    new = jax.device_get(single["state"].params)
    if name == "tips":
        extra, want = sharded["state"].extra, single["state"].extra
        # Teacher and centres leaf by leaf. The floor: teacher leaves that start at zero (biases) hold only (1 - m)
        # x one Adam update (norm ~1e-4), where Adam's amplified fp32 noise of the key-bias gradient is 2e-5
        # relative (measured; qkv bias); below norm 1e-3 a leaf must agree to 1e-8 absolute.
        assert_trees_close(extra, want, rtol=1e-5, zero_floor=1e-3)
        assert set(want) == {"teacher", "center_cls", "center_patch"}
        # The teacher is sharded like the student, and moved by exactly (1 - m) of the way to the new student.
        t_leaf = extra["teacher"]["image"]["encoder"]["block_0"]["mlp"]["fc1"]["kernel"]
        s_leaf = sharded["state"].params["image"]["encoder"]["block_0"]["mlp"]["fc1"]["kernel"]
        assert t_leaf.sharding == s_leaf.sharding
        m = single["exp"].config.distill.ema_momentum
        teacher0 = single["initial"].extra["teacher"]
        expect = jax.tree.map(lambda t, s: m * t + (1 - m) * s, teacher0,
                              {k: new[k] for k in ("image", "dino_head")})
        assert rel_diff(want["teacher"], expect) <= 1e-6
        assert {"loss_contrastive_cls1", "loss_contrastive_cls2", "loss_dino", "loss_ibot"} <= set(single["metrics"])
    if name == "eva":  # the frozen teacher is not touched by the step
        assert rel_diff(single["state"].extra, single["initial"].extra) == 0.0
        assert -1.0 <= single["metrics"]["loss"] <= 1.0


def test_tips_extra_state_checkpoint_round_trip(tmp_path):
    exp = build_experiment(mim_config("tips"))
    state = exp.init_state()
    state = state.replace(extra=jax.tree.map(lambda x: x + 0.5, state.extra))
    checkpointer = Checkpointer(tmp_path, max_to_keep=1, async_save=False)
    checkpointer.save(3, state, None, force=True)
    step, restored = checkpointer.restore(exp.abstract_state)
    checkpointer.close()
    assert step == 3
    assert rel_diff(restored.extra, state.extra) == 0.0
    assert restored.extra["center_cls"].shape == (64,)


def test_image_only_objectives_reject_text_evals():
    config = mim_config("simmim")
    with config.unlocked():
        config.evals.zeroshot = dict(type="zeroshot", split="validation", num_examples=8, batch_size=8)
    with pytest.raises(ValueError, match="evals.zeroshot.type='zeroshot' needs an objective with encode_text"):
        vlp_config.validate(config)
    with pytest.raises(ValueError, match="accumulation.steps=2 is not supported by objective 'tips'"):
        from vlp.train.trainer import make_train_step

        exp = build_experiment(mim_config("tips"))
        make_train_step(exp.objective, exp.optimizer, exp.schedule, 0, accumulation_steps=2)
