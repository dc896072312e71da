"""ALIGN trains: configs/align.py:tiny, shrunk to the test towers (tests/conftest.py tiny_config's dims), lowers its
loss (InfoNCE with label smoothing 0.1 and a learnable temperature) on shapes within a few dozen steps."""

import jax
import numpy as np
from conftest import REPO

from vlp import config as vlp_config
from vlp.parallel import sharding
from vlp.train.trainer import build_experiment, jit_train_step, make_train_iterator

STEPS = 40


def align_config():
    config = vlp_config.load_config_file(str(REPO / "configs" / "align.py") + ":tiny")
    config.model.image.update(width=32, depth=1, mlp_dim=64, num_heads=2)
    config.model.text.update(width=32, depth=1, mlp_dim=64, num_heads=2)
    config.model.embed_dim = 32
    config.batch_size = 16
    config.total_steps = STEPS
    config.seed = 0
    config.optim.update(lr=2e-3, warmup_steps=5)
    config.mesh.num_devices = 1
    return config


def test_align_tiny_lowers_its_loss():
    exp = build_experiment(align_config())
    assert exp.objective.config.objective == "align" and exp.config.loss.label_smoothing == 0.1
    state, step, data = exp.init_state(), jit_train_step(exp), make_train_iterator(exp.config, exp.objective)
    losses = []
    with exp.context():
        for _ in range(STEPS):
            state, metrics = step(state, sharding.host_to_global(next(data), exp.mesh))
            losses.append(float(metrics["loss"]))
    losses = np.array(losses)
    assert np.isfinite(losses).all()
    first, last = losses[:5].mean(), losses[-5:].mean()
    # At init (tiny: T = 0.1) the embeddings are unrelated: no better than uniform, ln 16 = 2.77 (measured 3.10:
    # at T = 0.1 random cosines of +-0.2 already spread the logits).
    assert first > np.log(16) - 0.1, first
    print(f"ALIGN tiny, steps 1-5 vs {STEPS - 4}-{STEPS}: {first:.3f} -> {last:.3f}")
    assert last < first - 0.5, (first, last)  # measured 3.10 -> 2.15
    assert jax.device_get(state.step) == STEPS
