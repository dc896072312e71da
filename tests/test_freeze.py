"""optim.freeze (LiT): matching params get exactly zero updates and no optimizer state, on 8 devices too."""

import jax
import numpy as np
import pytest
from conftest import tiny_config

from vlp.train.optim import make_optimizer, param_path
from vlp.train.restore import restore_run
from vlp.train.trainer import train_and_evaluate


def flat(tree):
    return {param_path(path): np.asarray(leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_frozen_image_tower_keeps_its_values_and_has_no_adam_state(tmp_path):
    config = tiny_config(**{"optim.freeze": "('image/.*',)", "total_steps": 3, "checkpoint_every": 1,
                            "keep_checkpoints": 5, "mesh.num_devices": 8})
    config.evals = {}  # only the params are checked: no eval compiles
    train_and_evaluate(config, tmp_path)
    _, _, first = restore_run(tmp_path, step=1)
    _, _, last = restore_run(tmp_path, step=3)
    before, after = flat(jax.device_get(first.params)), flat(jax.device_get(last.params))
    image = [k for k in before if k.startswith("image/")]
    others = [k for k in before if not k.startswith("image/")]
    assert image and others
    for key in image:
        np.testing.assert_array_equal(before[key], after[key], err_msg=key)
    assert sum(not np.array_equal(before[k], after[k]) for k in others) == len(others)  # every trained param moved
    state_sizes = sum(np.size(x) for x in jax.tree.leaves(last.opt_state))
    trained_sizes = sum(np.size(before[k]) for k in others)
    assert state_sizes < 2 * trained_sizes + 100  # Adam's two moments of the trained params (+ counters) only


def test_a_freeze_pattern_that_matches_nothing_names_the_parameters():
    config = tiny_config(**{"optim.freeze": "('imgae/.*',)"})
    optimizer, _ = make_optimizer(config.optim, config.total_steps)
    params = {"image": {"kernel": np.zeros((2, 2))}, "text": {"kernel": np.zeros((2, 2))}}
    with pytest.raises(ValueError, match=r"optim.freeze pattern 'imgae/.\*' matches no parameter; .*top-level names: "
                                         r"\['image', 'text'\]"):
        optimizer.init(params)
