"""Test setup: 8 virtual CPU devices for the whole session (set before jax is imported), so sharded tests can
compare a mesh of 8 against a 1x1x1 mesh of the first device in the same process."""

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

# Compilation dominates this suite on 2 cores: skip LLVM's expensive passes (every comparison runs under the same
# flags), which roughly halves compile times.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
                           " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Many tests build the same tiny programs in new closures; a session-wide persistent compilation cache compiles each
# once (JAX keys it on the program, flags and devices, so a hit is the same executable). Subprocesses inherit it.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _CACHE = tempfile.mkdtemp(prefix="vlp-test-jax-cache-")
    atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
    os.environ.update(JAX_COMPILATION_CACHE_DIR=_CACHE, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def load_tool(name: str, folder: str = "tools"):
    """The module of `<repo>/<folder>/<name>.py` (tools/ and configs/ are scripts, not packages)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"vlp_{folder}_{name}", REPO / folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_config(arg: str = "", **updates):
    """configs/clip.py:tiny shrunk for fast tests: a 32-wide model, small evals, one device; `updates` are dotted
    keys."""
    from vlp import config as vlp_config

    config = vlp_config.load_config_file(str(REPO / "configs" / "clip.py") + ":tiny" + ("," + arg if arg else ""))
    config.model.image.update(width=32, depth=1, mlp_dim=64, num_heads=2)
    config.model.text.update(width=32, depth=1, mlp_dim=64, num_heads=2)
    config.model.embed_dim = 32
    config.batch_size = 16
    config.total_steps = 8
    config.optim.warmup_steps = 2
    config.log_every, config.eval_every, config.checkpoint_every = 1, 1000, 1000
    config.evals.zeroshot.num_examples = 64
    config.evals.retrieval.num_examples = 64
    config.evals.zeroshot.batch_size = 32
    config.evals.retrieval.batch_size = 32
    config.async_checkpointing = False
    config.mesh.num_devices = 1  # sharded tests ask for all 8 devices explicitly
    vlp_config.apply_overrides(config, {k: str(v) for k, v in updates.items()})
    return config


def tree_leaf_errors(got, want) -> list[tuple[str, float, float]]:
    """(path, ||got - want||, ||want||) of every leaf, in float64; the trees must have the same structure."""
    import jax
    import numpy as np

    got, want = jax.device_get(got), jax.device_get(want)
    assert jax.tree.structure(got) == jax.tree.structure(want), (jax.tree.structure(got), jax.tree.structure(want))
    rows = []
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
        g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
        assert g.shape == w.shape, (jax.tree_util.keystr(path), g.shape, w.shape)
        rows.append((jax.tree_util.keystr(path), float(np.linalg.norm(g - w)), float(np.linalg.norm(w))))
    return rows


def assert_trees_close(got, want, rtol: float = 1e-5, zero_floor: float = 0.0) -> None:
    """Every leaf: ||got - want|| <= rtol * max(||want||, zero_floor) (norms over the leaf).

    `zero_floor` is an absolute norm below which a leaf counts as zero: a gradient that is exactly zero in exact
    arithmetic (e.g. an attention key bias, which softmax cancels) is fp32 rounding noise whose relative error
    means nothing; such a leaf must still be below rtol * zero_floor in absolute terms."""
    bad = [(path, err, norm) for path, err, norm in tree_leaf_errors(got, want)
           if not err <= rtol * max(norm, zero_floor)]
    assert not bad, "leaves differ (path, ||got - want||, ||want||): " + "; ".join(
        f"{p} {e:.3g} {n:.3g}" for p, e, n in bad[:10])


def assert_same_update(got_params, want_params, initial, lr: float, rtol: float) -> None:
    """The reference step moved the params like AdamW's first step (~lr per element: ||update|| between 0.5 and 1.1
    lr sqrt(n); measured ~0.85), and `got_params - initial` equals `want_params - initial` by global-norm relative
    difference. The update, not the params, is compared: params are ~100x larger than one step's update."""
    import jax
    import numpy as np

    def update(params):
        return [np.asarray(p, np.float64) - np.asarray(i, np.float64)
                for p, i in zip(jax.tree.leaves(jax.device_get(params)), jax.tree.leaves(jax.device_get(initial)))]

    got, want = np.concatenate([np.ravel(u) for u in update(got_params)]), \
        np.concatenate([np.ravel(u) for u in update(want_params)])
    moved = np.linalg.norm(want) / (lr * np.sqrt(want.size))
    assert lr > 0 and 0.5 <= moved <= 1.1, f"update norm {moved:.3g} x lr sqrt(n) at lr {lr}: the step did not move"
    diff = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert diff <= rtol, f"updates differ by {diff:.3g} (global-norm relative) > {rtol}"


def objective_loss_and_grads(exp, batch: dict, params=None, seed: int = 0):
    """The objective's loss and gradient on `exp`'s mesh, as the sharded-step tests compare them: `params` (a host
    tree; None = `exp.init_state()`'s) placed with the run's shardings, `batch` made global, `loss_fn` jitted with
    rng key `seed`. Returns (loss, metrics, grads, params), all on the host."""
    import jax

    from vlp.parallel import sharding

    with exp.context():
        placed = exp.init_state().params if params is None else jax.device_put(params, exp.state_shardings.params)
        fn = jax.jit(jax.value_and_grad(lambda p, b: exp.objective.loss_fn(p, b, jax.random.key(seed)), has_aux=True))
        (loss, metrics), grads = fn(placed, sharding.host_to_global(batch, exp.mesh))
    return (float(loss), *jax.device_get((metrics, grads, placed)))


# The longest files first (their measured durations on 2 cores, longest first): `make test` runs pytest-xdist with
# `--dist loadfile`, which hands out files in collection order, so a long file collected last can leave the other
# worker idle for a minute at the end. A stable sort keeps every file's own order and the rest alphabetical.
LONGEST_FILES = ("test_learning.py", "test_albef.py", "test_distributed.py", "test_mim_distributed.py",
                 "test_mim_objectives.py", "test_reference.py", "test_cli.py", "test_soak.py", "test_reproducibility.py",
                 "test_symile.py", "test_benchmarks.py", "test_preemption.py", "test_accumulation.py", "test_eva.py")


def pytest_collection_modifyitems(items) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONGEST_FILES)))
