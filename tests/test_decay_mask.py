"""Weight decay follows big_vision / timm on the real param trees of clip, siglip (MAP head), tips and mae: matrices
and conv kernels decay; biases, LayerNorm scales, logit scale/bias, learned tokens (CLS, mask, MAP probe) and
position embeddings do not. Also: optim.grad_clip_norm=0 turns clipping off (MAE's configs)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import REPO

from vlp import config as vlp_config
from vlp.objectives import get_objective
from vlp.parallel.sharding import strip_boxes
from vlp.train.optim import decay_mask, make_optimizer, param_path

# The weights: what a layer multiplies its input by (named as flax names them).
WEIGHT_NAMES = {"kernel", "embedding", "prototypes"}


def tiny(name: str):
    config = vlp_config.load_config_file(str(REPO / "configs" / f"{name}.py") + ":tiny")
    config.optim.warmup_steps = 0
    config.optim.schedule = "constant"
    return config


def param_shapes(name: str):
    config = tiny(name)
    return strip_boxes(jax.eval_shape(get_objective(name)(config).init, jax.random.key(0)))


def decayed_paths(name: str) -> dict[str, bool]:
    shapes = param_shapes(name)
    flat = jax.tree_util.tree_flatten_with_path(shapes)[0]
    mask = jax.tree.leaves(decay_mask(shapes))
    return {param_path(path): (bool(m), leaf.shape) for (path, leaf), m in zip(flat, mask)}


@pytest.mark.parametrize("name,must_hold", [
    ("clip", {"image/cls_token", "image/pos_embed", "text/pos_embed", "log_logit_scale", "image/patch_embed/kernel",
              "text/token_embed/embedding", "image_proj/kernel"}),
    ("siglip", {"image/map_head/probe", "logit_bias", "log_logit_scale"}),
    ("tips", {"image/cls_token", "image/mask_token", "dino_head/prototypes", "logit_scale/log_logit_scale"}),
    ("mae", {"decoder/mask_token", "image/cls_token", "decoder/pred/kernel"}),
])
def test_decay_on_weight_matrices_only(name, must_hold):
    paths = decayed_paths(name)
    assert must_hold <= set(paths), sorted(set(must_hold) - set(paths))  # the tree has the params the rule is about
    for path, (decays, shape) in paths.items():
        leaf = path.rsplit("/", 1)[-1]
        assert decays == (leaf in WEIGHT_NAMES and len(shape) >= 2), (name, path, shape, decays)
    decayed = sorted(p for p, (d, _) in paths.items() if d)
    print(name, "decays:", decayed)
    assert decayed and len(decayed) < len(paths)


def test_adamw_decays_exactly_the_masked_params():
    """Zero gradients: Adam's step is 0, so each param moves only by its decay, -lr * wd * p (or not at all)."""
    config = tiny("siglip")
    params = jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype), param_shapes("siglip"))
    optimizer, _ = make_optimizer(config.optim, config.total_steps)
    updates, _ = optimizer.update(jax.tree.map(jnp.zeros_like, params), optimizer.init(params), params)
    mask = decay_mask(params)
    lr, wd = config.optim.lr, config.optim.weight_decay
    for update, decays in zip(jax.tree.leaves(updates), jax.tree.leaves(mask)):
        np.testing.assert_allclose(np.asarray(update), -lr * wd if decays else 0.0, rtol=1e-6)
    assert not decay_mask(params)["image"]["map_head"]["probe"]


@pytest.mark.parametrize("variant", ["tiny", "B/16"])
def test_mae_does_not_clip_gradients(variant):
    """As the reference MAE: the optimizer is plain AdamW, even for a gradient far above any clipping norm."""
    config = vlp_config.load_config_file(str(REPO / "configs" / "mae.py") + f":{variant}")
    optim = config.optim
    assert optim.grad_clip_norm == 0
    optimizer, schedule = make_optimizer(optim, config.total_steps)
    params = {"w": jnp.arange(6.0).reshape(2, 3)}
    reference = optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps, weight_decay=optim.weight_decay)
    state, ref_state = optimizer.init(params), reference.init(params)
    for scale in (1.0, 1e3):  # two steps of very different norms: clipping would change their ratio
        grads = {"w": scale * jnp.linspace(-1.0, 2.0, 6).reshape(2, 3)}
        updates, state = optimizer.update(grads, state, params)
        want, ref_state = reference.update(grads, ref_state, params)
        np.testing.assert_allclose(np.asarray(updates["w"]), np.asarray(want["w"]), rtol=1e-6)


def test_negative_grad_clip_norm_is_rejected():
    config = tiny("mae")
    config.optim.grad_clip_norm = -1.0
    with pytest.raises(ValueError, match=r"optim.grad_clip_norm=-1.0 must be >= 0 \(0 or None: no clipping\)"):
        vlp_config.validate(config)
