"""ALBEF and TCL: one TCL train step on a 2x4x1 mesh equals one device (loss, every gradient leaf, momentum model and
queues after the step; TCL's loss runs ALBEF's whole forward, so one compiled pair covers both within the suite's
time budget), ALBEF's resume exactness, the EMA extremes (m = 1 keeps the momentum model, m = 0 copies), the queue's FIFO enqueue of
the step's momentum features, TCL's second view, and config errors."""

import jax
import numpy as np
import pytest
from conftest import REPO, assert_trees_close

from vlp import config as vlp_config
from vlp.data.mlm import IGNORE_LABEL
from vlp.data.pipeline import TrainStreamSpec, make_train_dataset
from vlp.data.sources import make_source
from vlp.data.transforms import SelectCaption, TokenizeBatch
from vlp.parallel import sharding
from vlp.train.trainer import build_experiment


def albef_config(objective="albef", **updates):
    config = vlp_config.load_config_file(str(REPO / "configs" / f"{objective}.py") + ":tiny")
    config.model.image.update(width=32, depth=1, mlp_dim=64, num_heads=2)
    config.model.text.update(width=32, depth=2, mlp_dim=64, num_heads=2)
    config.model.embed_dim = 32
    config[objective].update(queue_size=64, alpha_ramp_steps=0)  # alpha = 0.4 from step 0: distillation is exercised
    config.batch_size = 16
    config.mesh.num_devices = 1
    config.optim.warmup_steps = 0  # the first step has the full learning rate
    vlp_config.apply_overrides(config, {k: str(v) for k, v in updates.items()})
    return config


@pytest.fixture(scope="module")
def batch():
    config = albef_config("tcl")  # albef's batch plus the second view
    objective = build_experiment(config).objective
    select = objective.train_example_transform(SelectCaption("both", 0))
    ds = make_train_dataset(make_source("shapes", "train", 32), select,
                            TokenizeBatch(objective.tokenizer, config.data.max_text_len), TrainStreamSpec(16, seed=0))
    return next(iter(ds))


def run_step(mesh_shape, num_devices, batch, initial=None, objective="albef"):
    exp = build_experiment(albef_config(objective, **{"mesh.shape": str(mesh_shape), "mesh.num_devices": num_devices}))
    objective = exp.objective
    with exp.context():
        state = exp.init_state()
        if initial is not None:  # every mesh starts from the very same params and extra state
            state = state.replace(params=jax.device_put(initial[0], exp.state_shardings.params),
                                  extra=jax.device_put(initial[1], exp.state_shardings.extra))
        global_batch = sharding.host_to_global(batch, exp.mesh)

        def step(params, extra, b):
            grad_fn = jax.value_and_grad(objective.loss_fn_with_extra, has_aux=True)
            (loss, (metrics, aux)), grads = grad_fn(params, extra, b, jax.random.key(3), state.step)
            # an SGD step stands in for the optimizer, so the EMA sees params that moved
            new_params = jax.tree.map(lambda p, g: p - 0.5 * g, params, grads)
            return loss, grads, metrics, new_params, objective.update_extra(extra, new_params, aux, state.step)

        loss, grads, metrics, new_params, new_extra = jax.jit(step)(state.params, state.extra, global_batch)
        start = jax.device_get((state.params, state.extra))
    return {"start": start, "loss": float(loss), "grads": jax.device_get(grads), "params": jax.device_get(new_params),
            "extra": jax.device_get(new_extra), "metrics": jax.device_get(metrics), "objective": objective}


@pytest.fixture(scope="module")
def single_tcl(batch):
    return run_step((1, 1, 1), 1, batch, objective="tcl")


def test_batch_carries_mlm_masks(batch):
    labels, text = batch["mlm_labels"], batch["text"]
    chosen = labels != IGNORE_LABEL
    assert chosen.any() and (labels[chosen] == text[chosen]).all()
    assert (batch["mlm_text"][~chosen] == text[~chosen]).all()


def test_tcl_sharded_step_equals_single_device(batch, single_tcl):
    sharded = run_step((2, 4, 1), -1, batch, single_tcl["start"], objective="tcl")
    assert abs(sharded["loss"] - single_tcl["loss"]) <= 1e-5 * abs(single_tcl["loss"])
    assert_trees_close(sharded["grads"], single_tcl["grads"], rtol=1e-5, zero_floor=1e-3)
    assert_trees_close(sharded["extra"], single_tcl["extra"], rtol=1e-5, zero_floor=1e-3)
    m = single_tcl["metrics"]
    ita = (2 * m["loss_itc"] + m["loss_i2i"] + m["loss_t2t"] + m["loss_lmi_image"] + m["loss_lmi_text"]) / 6
    np.testing.assert_allclose(m["loss_ita"], ita, rtol=1e-6)
    np.testing.assert_allclose(single_tcl["loss"], ita + m["loss_itm"] + m["loss_mlm"], rtol=1e-5)
    assert 0.0 < m["loss_itm"] < 1.5 and m["loss_mlm"] > 1.0 and float(m["alpha"]) == pytest.approx(0.4)


def test_albef_sharded_step_equals_single_device(batch):
    single = run_step((1, 1, 1), 1, batch)
    sharded = run_step((2, 4, 1), -1, batch, single["start"])
    assert abs(sharded["loss"] - single["loss"]) <= 1e-5 * abs(single["loss"])
    assert_trees_close(sharded["grads"], single["grads"], rtol=1e-5, zero_floor=1e-3)
    assert_trees_close(sharded["extra"], single["extra"], rtol=1e-5, zero_floor=1e-3)  # momentum model and queues
    m = single["metrics"]
    np.testing.assert_allclose(single["loss"], m["loss_itc"] + m["loss_itm"] + m["loss_mlm"], rtol=1e-5)
    assert 0.0 < m["loss_itm"] < 1.5 and m["loss_mlm"] > 1.0


def test_tcl_second_view_keeps_geometry_and_differs(batch):
    view, image = batch["image_aug"], batch["image"]
    assert view.shape == image.shape and not np.allclose(view, image)
    # photometric only: the two views stay strongly correlated pixel by pixel
    assert np.corrcoef(view.reshape(-1), image.reshape(-1))[0, 1] > 0.8


def test_step_enqueues_momentum_features_and_moves_the_pointer(single_tcl):
    before, after = single_tcl["start"][1], single_tcl["extra"]
    assert int(before["queue_ptr"]) == 0 and int(after["queue_ptr"]) == 16
    # rows 0..15 are the step's (unit-norm) momentum features, the rest is the untouched initial queue
    for name in ("image_queue", "text_queue"):
        np.testing.assert_allclose(np.linalg.norm(after[name][:16], axis=-1), 1.0, rtol=1e-5)
        assert not np.allclose(after[name][:16], before[name][:16])
        np.testing.assert_array_equal(after[name][16:], before[name][16:])


@pytest.mark.parametrize("momentum", [1.0, 0.0])
def test_ema_extremes(single_tcl, momentum):
    objective = single_tcl["objective"]
    objective.block = objective.block.copy_and_resolve_references()
    objective.block.momentum = momentum
    extra, params = single_tcl["start"][1], single_tcl["params"]
    aux = {"image_feat_m": np.zeros((16, 32), np.float32), "text_feat_m": np.zeros((16, 32), np.float32)}
    new = jax.device_get(objective.update_extra(extra, params, aux, np.int32(0)))
    want = extra["momentum"] if momentum == 1.0 else {k: params[k] for k in extra["momentum"]}
    assert_trees_close(new["momentum"], want, rtol=1e-7)
    moved = jax.tree.leaves(jax.tree.map(lambda a, b: np.abs(a - b).max(), extra["momentum"],
                                         {k: params[k] for k in extra["momentum"]}))
    assert max(moved) > 0  # the step did move the params, so the two cases differ


@pytest.mark.parametrize("updates,message", [
    ({"albef.queue_size": 100}, "albef.queue_size=100 must be a positive multiple of batch_size=16"),
    ({"albef.fusion_layer": 2}, r"albef.fusion_layer=2 must be an integer in \[1, model.text.depth=2\)"),
    ({"albef.batch_scope": "world"}, "albef.batch_scope='world'; valid: \\('global', 'local'\\)"),
])
def test_config_errors(updates, message):
    with pytest.raises(ValueError, match=message):
        build_experiment(albef_config(**updates))


def test_resumed_run_reproduces_the_uninterrupted_losses(tmp_path):
    """Killed after step 2, the run restored from that checkpoint gives the very same losses at steps 3 and 4: the
    momentum model, the queues and their pointer, and the per-visit MLM masks all come back."""
    import shutil

    from vlp.train.metrics import read_jsonl
    from vlp.train.trainer import train_and_evaluate

    config = albef_config(total_steps=4, batch_size=8, checkpoint_every=2, log_every=1, eval_every=1000,
                          async_checkpointing=False, **{"data.read_threads": 1, "albef.queue_size": 16})
    with config.unlocked():
        config.evals = {}

    def losses(workdir):
        return {r["step"]: r["loss"] for r in read_jsonl(workdir / "metrics.jsonl") if "loss" in r}

    train_and_evaluate(config, tmp_path / "full")
    full = losses(tmp_path / "full")
    shutil.copytree(tmp_path / "full" / "checkpoints" / "2", tmp_path / "resumed" / "checkpoints" / "2")
    assert train_and_evaluate(config, tmp_path / "resumed")["resumed_from_step"] == 2
    resumed = losses(tmp_path / "resumed")
    assert sorted(resumed) == [3, 4] and all(resumed[s] == full[s] for s in (3, 4)), (resumed, full)


@pytest.mark.parametrize("spec", ["albef.py:B/16", "tcl.py:B/16"])
def test_cluster_variants_build(spec):
    """ViT-B/16 + BERT-base (6 text + 6 fusion layers); the queues are 2 x 65,536 x 256 replicated floats."""
    exp = build_experiment(vlp_config.load_config_file(str(REPO / "configs" / spec)))  # abstract only
    count = sum(x.size for x in jax.tree.leaves(exp.abstract_state.params))
    assert count > 1.6e8, (spec, count)
    extra = exp.abstract_state.extra
    assert extra["image_queue"].shape == extra["text_queue"].shape == (65_536, 256)
    assert exp.state_shardings.extra["image_queue"].spec == jax.sharding.PartitionSpec(None, None)
