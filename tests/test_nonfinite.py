"""A NaN batch never updates the params; nan_policy decides whether the run stops or goes on."""

import jax
import numpy as np
import pytest
from conftest import tiny_config

from vlp.parallel import sharding
from vlp.train.trainer import NonFiniteLossError, build_experiment, check_finite, jit_train_step


def test_nan_batch_is_not_applied_and_is_counted():
    exp = build_experiment(tiny_config())
    state = exp.init_state()
    step = jit_train_step(exp)
    batch = exp.objective.example_batch(16)
    batch["image"][:] = np.nan
    before = jax.device_get(state.params)
    with exp.context():
        new_state, metrics = step(state, sharding.host_to_global(batch, exp.mesh))
    assert int(metrics["nonfinite"]) == 1 and not np.isfinite(float(metrics["loss"]))
    assert int(new_state.step) == 1  # the step is counted, so the data stream moves on
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(jax.device_get(new_state.params))):
        np.testing.assert_array_equal(a, b)


def test_policy_stop_names_the_step_and_the_term():
    logged = {"loss": float("nan"), "loss_i2t": float("nan"), "loss_t2i": 1.0, "nonfinite_steps": 1.0}
    with pytest.raises(NonFiniteLossError, match=r"up to step 7.*'loss', 'loss_i2t'.*nan_policy='skip'"):
        check_finite("stop", 7, logged)
    check_finite("skip", 7, logged)  # counted in the metrics, the run goes on
    check_finite("stop", 8, {"loss": 1.0, "nonfinite_steps": 0.0})
