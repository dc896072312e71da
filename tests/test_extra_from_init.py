"""A run started from `init_from` builds its extra state from the loaded params: TIPS's EMA teacher starts as the
loaded image tower and DINO head (bit-exact), not as the random init the loaded params replaced."""

from pathlib import Path

import jax
import numpy as np
from conftest import REPO

from vlp import config as vlp_config
from vlp.train import trainer
from vlp.train.checkpoint import Checkpointer


def tips_config(**updates):
    config = vlp_config.load_config_file(str(REPO / "configs" / "tips.py") + ":tiny")
    config.model.image.update(width=32, depth=1, mlp_dim=64, num_heads=2)
    config.model.text.update(width=32, depth=1, mlp_dim=64, num_heads=2)
    config.model.embed_dim = 32
    config.distill.update(num_prototypes=64, head_hidden=32, head_bottleneck=16, head_layers=2)
    config.mesh.num_devices = 1
    vlp_config.apply_overrides(config, {k: str(v) for k, v in updates.items()})
    return config


def test_tips_from_init_from_starts_its_teacher_from_the_loaded_params(tmp_path: Path):
    source = tmp_path / "source"
    exp = trainer.build_experiment(tips_config(seed=1))  # other params than the seed-0 run below draws
    state = exp.init_state()
    checkpointer = Checkpointer(source / "checkpoints", max_to_keep=1, async_save=False)
    checkpointer.save(7, state, None, force=True)
    checkpointer.close()
    loaded = jax.device_get(state.params)

    exp = trainer.build_experiment(tips_config(**{"init_from.path": source, "mesh.shape": "(1, 8, 1)",
                                                  "mesh.num_devices": 8}))
    checkpointer = Checkpointer(tmp_path / "run" / "checkpoints", max_to_keep=1, async_save=False)
    step, start = trainer._initial_state(exp, checkpointer, None)
    checkpointer.close()
    assert step == 0
    teacher = start.extra["teacher"]
    for key in ("image", "dino_head"):
        same = jax.tree.map(lambda t, p: np.array_equal(np.asarray(t), p), jax.device_get(teacher[key]), loaded[key])
        assert all(jax.tree.leaves(same)), key
    # ... sharded like the student, and the centres start at zero.
    kernel = ("encoder", "block_0", "mlp", "fc1", "kernel")
    t, s = teacher["image"], start.params["image"]
    for part in kernel:
        t, s = t[part], s[part]
    assert t.sharding == s.sharding and not t.sharding.is_fully_replicated
    assert float(np.abs(np.asarray(start.extra["center_cls"])).max()) == 0.0
