"""model.scan_layers (blocks under nn.scan) and model.remat_policy: the same numbers as the unscanned, un-rematted
model; checkpoints, init_from and export convert between the two param layouts."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, tiny_config
from flax import traverse_util

from vlp import config as vlp_config
from vlp.export import interop
from vlp.export.common import ModelSpec
from vlp.export.safetensors_io import flatten_params, save_safetensors
from vlp.models import layers
from vlp.models.layout import layout_of, restack, stack_layers, unstack_layers
from vlp.parallel import sharding
from vlp.train.checkpoint import Checkpointer
from vlp.train.init_from import load_init_params
from vlp.train.trainer import build_experiment

DEPTHS = {"model.image.depth": 2, "model.text.depth": 2}


def config_for(scan: bool, policy: str = "none", **updates):
    return tiny_config(**DEPTHS, **{"model.scan_layers": scan, "model.remat_policy": policy}, **updates)


def rel_diff(a, b) -> float:
    a = np.concatenate([np.ravel(x) for x in jax.tree.leaves(jax.device_get(a))])
    b = np.concatenate([np.ravel(x) for x in jax.tree.leaves(jax.device_get(b))])
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def leaf_rel_diffs(a: dict, b: dict) -> dict[str, float]:
    fa, fb = flatten_params(a), flatten_params(b)
    assert sorted(fa) == sorted(fb)
    return {k: float(np.linalg.norm(fa[k] - fb[k]) / max(np.linalg.norm(fb[k]), 1e-30)) for k in fb}


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    return {"image": rng.normal(size=(16, 32, 32, 3)).astype(np.float32),
            "text": rng.integers(1, 30, size=(16, 12)).astype(np.int32),
            "label": np.zeros(16, np.int32)}


@pytest.fixture(scope="module")
def unscanned(batch):
    exp = build_experiment(config_for(False))
    params = jax.device_get(exp.init_state().params)
    with exp.context():
        loss, grads = jax.jit(jax.value_and_grad(lambda p, b: exp.objective.loss_fn(p, b, jax.random.key(0))[0]))(
            params, batch)
    return {"params": params, "loss": float(loss), "grads": jax.device_get(grads)}


def test_scanned_sharded_loss_and_every_gradient_equal_unscanned_one_device(batch, unscanned):
    """The scanned, rematted model on a 2x4x1 mesh (FSDP over 4) == the unscanned model on 1 device, from the same
    (converted) params."""
    exp = build_experiment(config_for(True, "full", **{"mesh.shape": "(2, 4, 1)", "mesh.num_devices": -1}))
    params = jax.device_put(restack(unscanned["params"], True), exp.state_shardings.params)
    qkv = params["image"]["encoder"]["blocks"]["attn"]["qkv"]["kernel"]
    assert qkv.shape == (2, 32, 3, 2, 16) and qkv.sharding.spec[:2] == (None, "fsdp")  # layers replicated
    grad_fn = jax.jit(jax.value_and_grad(lambda p, b: exp.objective.loss_fn(p, b, jax.random.key(0))[0]))
    with exp.context():
        loss, grads = grad_fn(params, sharding.host_to_global(batch, exp.mesh))
    assert abs(float(loss) - unscanned["loss"]) / abs(unscanned["loss"]) <= 1e-5
    assert layout_of(grads) is True
    diffs = leaf_rel_diffs(restack(jax.device_get(grads), False), unscanned["grads"])
    assert max(diffs.values()) <= 1e-5, {k: v for k, v in diffs.items() if v > 1e-5}


@pytest.fixture(scope="module")
def encoder_case():
    x = jax.random.normal(jax.random.key(1), (2, 6, 16))
    target = jax.random.normal(jax.random.key(2), (2, 6, 16))
    params = layers.Encoder(3, 2, 32).init(jax.random.key(0), x, None, True)["params"]
    return x, target, sharding.strip_boxes(params)


def encoder_grads(case, scan: bool, policy: str):
    x, target, params = case
    model = layers.Encoder(3, 2, 32, remat_policy=policy, scan=scan)

    def loss(p, x):
        return jnp.mean((model.apply({"params": p}, x, None, True) - target) ** 2)

    return jax.jit(jax.grad(loss, argnums=(0, 1)))(restack(params, scan), x)


@pytest.mark.parametrize("policy", ["full", "dots_saveable", "dots_with_no_batch_dims_saveable"])
def test_every_remat_policy_gives_the_gradients_of_none(policy, encoder_case):
    reference_params, reference_x = encoder_grads(encoder_case, False, "none")
    for scan in (False, True):
        grads, grad_x = encoder_grads(encoder_case, scan, policy)
        diffs = leaf_rel_diffs(restack(grads, False), reference_params)
        assert max(diffs.values()) <= 1e-5, (scan, diffs)
        assert rel_diff(grad_x, reference_x) <= 1e-5


def test_scanned_params_have_a_layers_axis():
    exp = build_experiment(config_for(True))
    qkv = exp.abstract_state.params["image"]["encoder"]["blocks"]["attn"]["qkv"]["kernel"]
    assert qkv.shape == (2, 32, 3, 2, 16)
    assert "block_0" not in exp.abstract_state.params["image"]["encoder"]
    with jax.set_mesh(exp.mesh):
        boxed = jax.eval_shape(exp.objective.init, jax.random.key(0))
    assert boxed["image"]["encoder"]["blocks"]["attn"]["qkv"]["kernel"].names[0] == "layers"


def test_stack_and_unstack_are_inverse_and_name_blocks():
    flat = {"image/encoder/block_0/mlp/fc1/kernel": np.full((3, 4), 0.0),
            "image/encoder/block_1/mlp/fc1/kernel": np.full((3, 4), 1.0),
            "image/encoder/block_0/ln_1/scale": np.zeros(3), "image/encoder/block_1/ln_1/scale": np.ones(3),
            "image/ln_post/scale": np.ones(3)}
    stacked = stack_layers(flat)
    assert sorted(stacked) == ["image/encoder/blocks/ln_1/scale", "image/encoder/blocks/mlp/fc1/kernel",
                               "image/ln_post/scale"]
    np.testing.assert_array_equal(stacked["image/encoder/blocks/mlp/fc1/kernel"][:, 0, 0], [0.0, 1.0])
    back = unstack_layers(stacked)
    assert sorted(back) == sorted(flat)
    for key, value in flat.items():
        np.testing.assert_array_equal(back[key], value)
    with pytest.raises(ValueError, match="block_0 ... block_1"):
        stack_layers({"e/block_0/ln_1/scale": np.ones(1), "e/block_2/ln_1/scale": np.ones(1)})


def test_offload_policy_on_cpu_is_a_clear_error():
    with pytest.raises(ValueError, match="offload_dots.*host offload.*valid here"):
        layers.remat_policy_fn("offload_dots")
    with pytest.raises(ValueError, match="unknown remat policy 'dotz'.*dots_saveable"):
        layers.remat_policy_fn("dotz")


def test_saved_configs_with_tower_remat_booleans_load_as_full_policy():
    saved = json.loads(vlp_config.to_json(tiny_config()))
    del saved["model"]["remat_policy"], saved["model"]["scan_layers"]
    saved["model"]["image"]["remat"], saved["model"]["text"]["remat"] = True, False
    config = vlp_config.from_dict(saved)
    assert config.model.remat_policy == "full" and config.model.scan_layers is False
    saved["model"]["image"]["remat"] = False
    assert vlp_config.from_dict(saved).model.remat_policy == "none"


def test_method_configs_keep_remat():
    for spec, policy in [("clip.py:L/14", "full"), ("clip.py:B/16", "none"), ("siglip.py:So400m/14", "full"),
                         ("coca.py:L/14", "full"), ("coca.py:B/16", "none")]:
        assert vlp_config.load_config_file(str(REPO / "configs" / spec)).model.remat_policy == policy


def test_scanned_export_equals_unscanned_export(tmp_path, unscanned):
    exp = build_experiment(config_for(False))
    spec = ModelSpec.from_model(exp.objective.model, 32)
    params = unscanned["params"]
    scanned = jax.device_get(restack(params, True))
    assert "blocks" in scanned["text"]["encoder"]
    for name, tree in [("plain", params), ("scanned", scanned)]:
        save_safetensors(tree, exp.objective.model_config(), tmp_path / name / "st")
        interop.write_hf(flatten_params(tree), spec, tmp_path / name / "hf")
    from safetensors.numpy import load_file
    for sub in ("st/model.safetensors", "hf/model.safetensors"):
        plain, scan = load_file(str(tmp_path / "plain" / sub)), load_file(str(tmp_path / "scanned" / sub))
        assert sorted(plain) == sorted(scan) and any("block_1" in k or ".1." in k for k in plain)
        for key in plain:
            np.testing.assert_array_equal(plain[key], scan[key])
    # ... and a scanned run imports the export (init_from format=safetensors), stacking it.
    config = config_for(True, **{"init_from.format": "safetensors", "init_from.path": str(tmp_path / "plain/st")})
    exp_scan = build_experiment(config)
    loaded = load_init_params(config, exp_scan.objective, exp_scan.abstract_state.params)
    assert rel_diff(loaded, scanned) == 0.0


def test_checkpoints_restore_across_layouts(tmp_path):
    """A resume (params and optimizer moments) and init_from's params read a checkpoint of the other layout."""
    exps = {scan: build_experiment(config_for(scan)) for scan in (False, True)}
    for saved_scan in (False, True):
        state = exps[saved_scan].init_state()
        state = state.replace(opt_state=jax.tree.map(lambda x: x + 1, state.opt_state))  # non-zero moments
        exp = exps[not saved_scan]
        checkpointer = Checkpointer(tmp_path / str(saved_scan), max_to_keep=2, async_save=False)
        try:
            checkpointer.save(3, state, None)
            checkpointer.wait()
            step, restored = checkpointer.restore(exp.abstract_state)
            step_p, params = checkpointer.restore_params(exp.abstract_state.params)
        finally:
            checkpointer.close()
        assert step == step_p == 3
        expected = jax.device_get(restack(state, not saved_scan))
        assert layout_of(restored.params) is (not saved_scan)
        assert jax.tree.structure(restored) == jax.tree.structure(exp.abstract_state)
        assert rel_diff(restored.params, expected.params) == 0.0
        assert rel_diff(restored.opt_state, expected.opt_state) == 0.0
        assert rel_diff(params, expected.params) == 0.0


def test_compile_benchmark_runs_for_a_tiny_config():
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "compile.py"), "--config=configs/clip.py:tiny",
         "--set=model.image.depth=1", "--set=model.text.depth=1", "--set=model.image.width=32",
         "--set=model.text.width=32", "--set=model.embed_dim=32", "--scan=true", "--policies=full", "--batch_size=8"],
        cwd=REPO, capture_output=True, text=True, timeout=300, env={**__import__("os").environ})
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [(r["scan_layers"], r["remat_policy"]) for r in rows] == [(True, "full")]
    for row in rows:
        assert row["compile_seconds"] > 0 and row["temp_bytes_per_device"] > 0
        assert row["argument_bytes_per_device"] > 0
