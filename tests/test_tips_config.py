"""TIPS's cluster configs can learn the released model's logit scale (~210, methods.md section 4.1); vlp's default
cap of 100 could not."""

import jax
import numpy as np
import pytest
from conftest import REPO

from vlp import config as vlp_config
from vlp.models.tips import LogitScale


@pytest.mark.parametrize("variant", ["B/16", "L/14"])
def test_tips_cluster_configs_reach_the_released_logit_scale(variant):
    config = vlp_config.load_config_file(str(REPO / "configs" / "tips.py") + f":{variant}")
    module = LogitScale(210.0, config.model.logit_scale_max)
    params = module.init(jax.random.key(0))
    np.testing.assert_allclose(float(module.apply(params)), 210.0, rtol=1e-5)
