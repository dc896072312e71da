"""Models: logical axis names on every parameter, sizes by name, pooling and masking behaviour."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlp.models import layers
from vlp.models.text import TextTransformer, pool_text
from vlp.models.two_tower import TwoTower
from vlp.models.vit import VIT_SIZES, ViT, vit_shape

TEXT = dict(vocab_size=50, max_len=8, width=32, depth=2, mlp_dim=64, num_heads=4, eos_id=49)
IMAGE = dict(width=32, depth=2, mlp_dim=64, num_heads=4, patch_size=8)
SCALARS = {"log_logit_scale", "temperature", "logit_bias"}


def boxed_params(model, *inputs):
    return jax.eval_shape(model.init, jax.random.key(0), *inputs)["params"]


@pytest.mark.parametrize("pool", ["cls", "gap", "map"])
def test_every_parameter_has_logical_axis_names(pool):
    model = TwoTower(image=dict(IMAGE, pool=pool), text=TEXT, embed_dim=16, logit_bias_init=-10.0)
    params = boxed_params(model, jnp.zeros((1, 32, 32, 3)), jnp.zeros((1, 8), jnp.int32))
    flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=lambda x: isinstance(x, nn.Partitioned))[0]
    for path, leaf in flat:
        name = jax.tree_util.keystr(path)
        if any(s in name for s in SCALARS):
            assert not isinstance(leaf, nn.Partitioned) and leaf.shape == (), name
            continue
        assert isinstance(leaf, nn.Partitioned), f"{name} has no logical axis names"
        assert len(leaf.names) == len(leaf.value.shape), name


@pytest.mark.parametrize("variant,millions", [("Ti/16", 5.5), ("S/16", 21.7), ("B/16", 85.8), ("L/14", 303.2),
                                              ("So400m/14", 412.4), ("g/14", 1011.0)])
def test_vit_sizes_by_name(variant, millions):
    shape = vit_shape(variant)
    model = ViT(shape.width, shape.depth, shape.mlp_dim, shape.num_heads, shape.patch_size, ln_pre=False)
    params = nn.unbox(boxed_params(model, jnp.zeros((1, 224, 224, 3))))
    count = sum(x.size for x in jax.tree.leaves(params)) / 1e6
    assert abs(count - millions) / millions < 0.02, (variant, count)


def test_unknown_vit_variant():
    with pytest.raises(ValueError, match=r"unknown ViT variant 'X/16'.*" + ".*".join(VIT_SIZES)):
        vit_shape("X/16")


def test_eot_pooling_takes_first_eos():
    tokens = jnp.asarray([[5, 6, 49, 0, 0], [7, 49, 0, 0, 0], [1, 2, 3, 4, 5]])
    features = jnp.arange(3 * 5 * 2, dtype=jnp.float32).reshape(3, 5, 2)
    pooled = np.asarray(pool_text(tokens, features, "eot", eos_id=49, pad_id=0))
    np.testing.assert_array_equal(pooled, np.asarray(features)[[0, 1, 2], [2, 1, 4]])
    mean = np.asarray(pool_text(tokens, features, "mean", eos_id=49, pad_id=0))
    np.testing.assert_allclose(mean[1], np.asarray(features)[1, :2].mean(axis=0))


def test_causal_text_ignores_later_tokens():
    model = TextTransformer(**TEXT, causal=True)
    tokens = jnp.asarray([[3, 4, 49, 0, 0, 0, 0, 0]])
    changed = tokens.at[0, 4:].set(17)
    params = model.init(jax.random.key(0), tokens)
    _, a = model.apply(params, tokens)
    _, b = model.apply(params, changed)
    np.testing.assert_allclose(np.asarray(a)[0, :4], np.asarray(b)[0, :4], atol=1e-6)
    assert not np.allclose(np.asarray(a)[0, 4:], np.asarray(b)[0, 4:])


def test_bidirectional_text_masks_padding():
    model = TextTransformer(**TEXT, causal=False, pool="mean")
    short = jnp.asarray([[3, 4, 49, 0, 0, 0, 0, 0]])
    params = model.init(jax.random.key(0), short)
    pooled_a, _ = model.apply(params, short)
    pooled_b, _ = model.apply(params, short[:, :4])
    np.testing.assert_allclose(np.asarray(pooled_a), np.asarray(pooled_b), atol=1e-5)


def test_activations_match_their_formulas():
    x = jnp.linspace(-4, 4, 101)
    np.testing.assert_allclose(layers.activation_fn("quick_gelu")(x), x / (1 + np.exp(-1.702 * x)), rtol=1e-5,
                               atol=1e-6)
    from math import erf

    exact = np.asarray([v * 0.5 * (1 + erf(v / np.sqrt(2))) for v in np.asarray(x, np.float64)])
    np.testing.assert_allclose(layers.activation_fn("gelu")(x), exact, atol=1e-6)
    assert np.abs(np.asarray(layers.activation_fn("gelu_tanh")(x)) - exact).max() > 1e-5


def test_fused_and_separate_qkv_have_the_same_function_space():
    x = jax.random.normal(jax.random.key(1), (2, 5, 32))
    fused = layers.Attention(4, fused_qkv=True)
    separate = layers.Attention(4, fused_qkv=False)
    pf = nn.unbox(fused.init(jax.random.key(0), x))
    ps = {"params": {"query": {"kernel": pf["params"]["qkv"]["kernel"][:, 0], "bias": pf["params"]["qkv"]["bias"][0]},
                     "key": {"kernel": pf["params"]["qkv"]["kernel"][:, 1], "bias": pf["params"]["qkv"]["bias"][1]},
                     "value": {"kernel": pf["params"]["qkv"]["kernel"][:, 2], "bias": pf["params"]["qkv"]["bias"][2]},
                     "out": pf["params"]["out"]}}
    np.testing.assert_allclose(fused.apply(pf, x), separate.apply(ps, x), atol=1e-6)


def test_embeddings_are_unit_norm_and_scale_is_clamped():
    model = TwoTower(image=IMAGE, text=TEXT, embed_dim=16, logit_scale_init=1000.0, logit_scale_max=100.0)
    variables = nn.unbox(model.init(jax.random.key(0), jnp.zeros((2, 32, 32, 3)), jnp.ones((2, 8), jnp.int32)))
    out = model.apply(variables, jnp.ones((2, 32, 32, 3)), jnp.ones((2, 8), jnp.int32))
    np.testing.assert_allclose(np.linalg.norm(out["image_emb"], axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(out["text_emb"], axis=1), 1.0, rtol=1e-5)
    assert float(out["logit_scale"]) == 100.0
    assert float(out["logit_bias"]) == 0.0
    alt = TwoTower(image=IMAGE, text=TEXT, embed_dim=16, logit_scale_init=1.0,
                   logit_scale_parameterization="temperature")
    alt_vars = nn.unbox(alt.init(jax.random.key(0), jnp.zeros((2, 32, 32, 3)), jnp.ones((2, 8), jnp.int32)))
    assert float(alt_vars["params"]["temperature"]) == 1.0
    assert float(alt.apply(alt_vars, method=TwoTower.logit_scale)) == 1.0
