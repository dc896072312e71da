"""The same train step on 8 virtual CPU devices (meshes 8x1x1, 2x4x1, 2x2x2) equals the 1-device step, and the
big variants' parameters are really split by FSDP and tensor parallelism."""

import jax
import pytest
from conftest import REPO, assert_same_update, assert_trees_close, tiny_config

from vlp.data.pipeline import TrainStreamSpec, make_train_dataset
from vlp.data.sources import make_source
from vlp.data.transforms import SelectCaption, TokenizeBatch
from vlp import config as vlp_config
from vlp.parallel import sharding
from vlp.train.trainer import build_experiment, jit_train_step


@pytest.fixture(scope="module")
def batch():
    config = tiny_config()
    exp = build_experiment(config)
    ds = make_train_dataset(make_source("shapes", "train", 32), SelectCaption("both", 0),
                            TokenizeBatch(exp.objective.tokenizer, config.data.max_text_len),
                            TrainStreamSpec(16, seed=0))
    return next(iter(ds))


def run_step(mesh_shape, num_devices, batch, initial_params=None):
    # warmup 0: the first step has the full learning rate (warmup from 0 would leave every param unchanged).
    config = tiny_config(**{"mesh.shape": str(mesh_shape), "mesh.num_devices": num_devices,
                            "optim.warmup_steps": 0})
    exp = build_experiment(config)
    state = exp.init_state()
    if initial_params is not None:  # start every mesh from the very same values
        state = state.replace(params=jax.device_put(initial_params, exp.state_shardings.params))
    step = jit_train_step(exp)
    grad_fn = jax.jit(jax.grad(lambda p, b: exp.objective.loss_fn(p, b, jax.random.key(0))[0]))
    with exp.context():
        global_batch = sharding.host_to_global(batch, exp.mesh)
        grads = grad_fn(state.params, global_batch)
        initial = jax.device_get(state.params)
        compiled_text = step.lower(state, global_batch).compile().as_text()
        new_state, metrics = step(state, global_batch)
        input_sharding = global_batch["image"].sharding
    return {"initial": initial, "grads": jax.device_get(grads), "params": jax.device_get(new_state.params),
            "loss": float(metrics["loss"]), "lr": float(metrics["lr"]), "hlo": compiled_text,
            "input_sharding": input_sharding}


@pytest.fixture(scope="module")
def single(batch):
    return run_step((1, 1, 1), 1, batch)


def assert_step_matches(sharded, single):
    """Every gradient leaf to rel 1e-5 (measured <= 1.8e-6; no leaf is zero here: the key bias is fused into the
    qkv bias); the AdamW update to rel 1e-4 by global norm (measured 2e-5: Adam's g / (|g| + eps) amplifies the fp32
    noise of the key-bias gradient, which is zero in exact arithmetic)."""
    assert_trees_close(sharded["grads"], single["grads"], rtol=1e-5)
    assert_same_update(sharded["params"], single["params"], single["initial"], single["lr"], rtol=1e-4)


@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (2, 4, 1), (2, 2, 2)])
def test_sharded_step_equals_single_device(mesh_shape, batch, single):
    sharded = run_step(mesh_shape, -1, batch, initial_params=single["initial"])
    assert abs(sharded["loss"] - single["loss"]) / abs(single["loss"]) <= 1e-5
    assert_step_matches(sharded, single)
    # The compiled step really is sharded: the batch is split over (data, fsdp) and the loss gathers embeddings.
    assert sharded["input_sharding"].spec[0] == ("data", "fsdp")
    assert len(sharded["input_sharding"].device_set) == 8
    assert "all-gather" in sharded["hlo"]


def test_fsdp_mesh_shards_parameters():
    config = tiny_config(**{"mesh.shape": "(1, 8, 1)", "mesh.num_devices": -1})
    exp = build_experiment(config)
    state = exp.init_state()
    assert sharding.sharded_fraction(state.params) > 0.9
    assert sharding.sharded_fraction(state.opt_state) > 0.9


def big_variant_shardings(spec, mesh_shape):
    config = vlp_config.load_config_file(str(REPO / "configs" / spec))
    vlp_config.apply_overrides(config, {"mesh.shape": str(mesh_shape)})
    return build_experiment(config).abstract_state  # shapes and shardings only: nothing is allocated


@pytest.mark.parametrize("spec", ["clip.py:B/16", "siglip.py:B/16"])
def test_fsdp_shards_at_least_95_percent_of_b16_parameter_bytes(spec):
    state = big_variant_shardings(spec, (1, 8, 1))
    params = jax.tree.leaves(state.params)
    assert sum(p.size for p in params) > 80e6  # really a B/16 (86M image tower + text tower)
    assert sharding.sharded_fraction(state.params) >= 0.95
    assert sharding.sharded_fraction(state.opt_state) >= 0.95  # Adam moments inherit the params' shardings


def test_tensor_parallel_splits_heads_and_mlp_of_big_variants():
    state = big_variant_shardings("clip.py:L/14", (1, 4, 2))
    specs = {"/".join(str(getattr(k, "key", k)) for k in path): leaf.sharding.spec
             for path, leaf in jax.tree_util.tree_leaves_with_path(state.params)}
    mlp_in = [spec for name, spec in specs.items() if name.startswith("image/") and "mlp" in name.lower()
              and name.endswith("kernel")]
    attention = [spec for name, spec in specs.items() if name.startswith("image/") and "attn" in name.lower()
                 and name.endswith("kernel")]
    assert mlp_in and attention, sorted(specs)[:20]
    # Every MLP and attention kernel is split on `tensor` (mlp / heads) and on `fsdp` (embed).
    for spec in mlp_in + attention:
        flat_axes = [a for axes in spec if axes for a in (axes if isinstance(axes, tuple) else (axes,))]
        assert "tensor" in flat_axes and "fsdp" in flat_axes, spec


def test_multislice_mesh_puts_the_data_axis_across_slices():
    import dataclasses

    from vlp.parallel.mesh import multislice_device_grid

    @dataclasses.dataclass(frozen=True)
    class FakeDevice:  # 2 slices x 4 devices with a slice_index, as in a multi-slice job (no TPU coordinates)
        id: int
        slice_index: int
        platform: str = "cpu"
        device_kind: str = "fake"
        process_index: int = 0

    devices = [FakeDevice(i, i // 4) for i in range(8)]
    grid = multislice_device_grid(devices, (4, 2, 1))
    assert grid.shape == (4, 2, 1)
    # data rows 0-1 live on slice 0 and rows 2-3 on slice 1: only `data` crosses the slices.
    assert [{d.slice_index for d in grid[row].ravel()} for row in range(4)] == [{0}, {0}, {1}, {1}]
    assert multislice_device_grid(devices[:4], (2, 2, 1)) is None  # one slice: the plain mesh
    with pytest.raises(ValueError, match=r"data axis \(1\) must be a multiple of the slice count"):
        multislice_device_grid(devices, (1, 8, 1))
