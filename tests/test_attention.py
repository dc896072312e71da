"""`model.attention`: every implementation that runs on CPU computes XLA's attention (forward and gradient, causal
and padding masks), `auto` follows the backend, and a GPU/TPU kernel asked for elsewhere fails at start with the
backend and the valid choices. (cuDNN needs an NVIDIA GPU: it is checked by its rules here, not run.)"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlp.models import layers
from vlp.parallel.mesh import make_mesh
from vlp.train.trainer import mesh_context
from vlp.parallel.sharding import DEFAULT_RULES

B, T, N, H = 2, 20, 2, 8


def numpy_attention(q, k, v, mask, causal):
    """softmax(q k^T / sqrt(H) masked) v per head, in float64; q, k, v [B, T, N, H], mask [B, 1, 1, T] or None."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    logits = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
    allowed = np.ones(logits.shape, bool)
    if mask is not None:
        allowed &= np.asarray(mask)
    if causal:
        allowed &= np.tril(np.ones((q.shape[1], k.shape[1]), bool))
    logits = np.where(allowed, logits, -np.inf)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    return np.einsum("bnts,bsnh->btnh", weights, v)


@pytest.fixture(scope="module")
def qkv_mask():
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=(B, T, N, H)).astype(np.float32)) for _ in range(3))
    valid = np.ones((B, T), bool)
    valid[0, 13:] = False  # example 0 has 13 tokens and 7 of padding
    return q, k, v, jnp.asarray(valid[:, None, None, :])


@pytest.mark.parametrize("causal,padding", [(False, False), (True, False), (False, True), (True, True)])
def test_attention_module_equals_numpy_reference(causal, padding):
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(B, T, N * H)).astype(np.float32))
    mask = jnp.asarray(rng.random((B, 1, 1, T)) > 0.3).at[:, :, :, 0].set(True) if padding else None
    module = layers.Attention(N, implementation="xla")
    params = nn.unbox(module.init(jax.random.key(0), x)["params"])
    out = module.apply({"params": params}, x, mask=mask, causal=causal)
    qkv = np.einsum("btd,dknh->btknh", np.asarray(x), np.asarray(params["qkv"]["kernel"])) + np.asarray(
        params["qkv"]["bias"])
    heads = numpy_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], mask, causal)
    expected = np.einsum("btnh,nhd->btd", heads, np.asarray(params["out"]["kernel"])) + np.asarray(
        params["out"]["bias"])
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_splash_kernel_equals_xla_forward_and_gradient(qkv_mask):
    """The TPU splash kernel (run by the Pallas interpreter) with a causal and a padding mask at once: same output
    and same gradients with respect to q, k and v as jax.nn.dot_product_attention(implementation='xla')."""
    q, k, v, mask = qkv_mask
    weights = jnp.asarray(np.random.default_rng(2).normal(size=(B, T, N, H)).astype(np.float32))

    def loss(attention):
        return lambda q, k, v: (attention(q, k, v) * weights).sum()

    splash = lambda q, k, v: layers.splash_attention(q, k, v, mask, causal=True, interpret=True)  # noqa: E731
    xla = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True,  # noqa: E731
                                                        implementation="xla")
    np.testing.assert_allclose(splash(q, k, v), numpy_attention(q, k, v, mask, True), rtol=1e-5, atol=1e-5)
    splash_grads = jax.jit(jax.grad(loss(splash), argnums=(0, 1, 2)))(q, k, v)
    xla_grads = jax.jit(jax.grad(loss(xla), argnums=(0, 1, 2)))(q, k, v)
    for name, a, b in zip("qkv", splash_grads, xla_grads):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=f"d loss / d {name}")


def test_splash_kernel_runs_sharded_over_batch_and_heads(qkv_mask):
    """Under a 2x1x2 mesh the kernel runs per device in a shard_map (batch on data, heads on tensor)."""
    q, k, v, mask = qkv_mask
    mesh = make_mesh((2, 1, 2), 4)
    with mesh_context(mesh, DEFAULT_RULES):
        out = jax.jit(lambda q, k, v: layers.splash_attention(q, k, v, mask, interpret=True))(q, k, v)
    np.testing.assert_allclose(out, numpy_attention(q, k, v, mask, False), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name,backend,dtype,head_dim,expected", [
    ("auto", "cpu", "auto", 64, "xla"),
    ("auto", "cuda", "auto", 64, "cudnn"),  # auto compute is bf16 on a GPU
    ("auto", "cuda", "float32", 64, "xla"),  # cuDNN flash attention has no fp32
    ("auto", "cuda", "bfloat16", 12, "xla"),  # head_dim not a multiple of 8
    ("auto", "rocm", "bfloat16", 64, "xla"),
    ("auto", "tpu", "auto", 64, "splash"),
    ("xla", "tpu", "auto", 64, "xla"),
    ("cudnn", "cuda", jnp.float16, 64, "cudnn"),
])
def test_auto_follows_the_backend(name, backend, dtype, head_dim, expected):
    assert layers.resolve_attention(name, backend, dtype, head_dim) == expected


@pytest.mark.parametrize("name,backend,dtype,message", [
    ("cudnn", "cpu", "auto", r"'cudnn' needs an NVIDIA GPU but the JAX backend is 'cpu'; valid on cpu: "
                             r"\['auto', 'xla'\]"),
    ("splash", "cuda", "auto", r"'splash' needs a TPU but the JAX backend is 'cuda'; valid on cuda: "
                               r"\['auto', 'xla', 'cudnn'\]"),
    ("cudnn", "cuda", "float32", r"'cudnn' computes in bf16/fp16 only, but the compute dtype is float32"),
    ("flash", "cuda", "auto", r"unknown attention implementation 'flash'; valid: \('auto', 'xla', 'cudnn', "
                              r"'splash'\)"),
])
def test_a_kernel_the_backend_cannot_run_is_refused(name, backend, dtype, message):
    with pytest.raises(ValueError, match=message):
        layers.resolve_attention(name, backend, dtype)


def test_model_built_with_a_gpu_kernel_on_cpu_fails_when_built():
    x = jnp.zeros((1, 4, 16))
    with pytest.raises(ValueError, match=r"'cudnn' needs an NVIDIA GPU but the JAX backend is 'cpu'"):
        layers.Attention(2, implementation="cudnn").init(jax.random.key(0), x)


@pytest.mark.parametrize("custom_backward", [True, False])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_head_major_attention_equals_jax_xla_path(qkv_mask, dtype, custom_backward):
    """The CPU path (heads first) computes jax.nn.dot_product_attention's XLA function: output and q/k/v gradients
    with a padding mask, causal or not, and with an example that attends to nothing, in fp32 and bf16 (fp32 logits),
    with its hand-written backward (the default) and with autodiff's."""
    q, k, v, padding = (x.astype(dtype) if x.dtype != bool else x for x in qkv_mask)
    fully_masked = padding.at[1].set(False)  # example 1 attends to nothing: uniform weights, no logit gradient
    for causal, mask in ((False, padding), (True, padding), (False, fully_masked)):
        def loss(attend, q, k, v):
            return (attend(q, k, v).astype(jnp.float32) ** 2).sum()

        ours = lambda q, k, v: layers.head_major_attention(q, k, v, mask, causal, custom_backward)  # noqa: E731
        theirs = lambda q, k, v: jax.nn.dot_product_attention(  # noqa: E731
            q, k, v, mask=mask, is_causal=causal, implementation="xla")
        tol = 1e-5 if dtype == jnp.float32 else 2e-2
        np.testing.assert_allclose(np.asarray(ours(q, k, v), np.float32), np.asarray(theirs(q, k, v), np.float32),
                                   rtol=tol, atol=tol)
        got = jax.grad(lambda *a: loss(ours, *a), argnums=(0, 1, 2))(q, k, v)
        want = jax.grad(lambda *a: loss(theirs, *a), argnums=(0, 1, 2))(q, k, v)
        for g, w in zip(got, want):
            np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32), rtol=tol, atol=tol)


def test_linear_flattens_only_output_axes_no_mesh_axis_splits():
    """Linear computes on flattened rows and (unless a mesh axis splits them) flattened output axes; both forms give
    the einsum's values and every gradient, and a heads-split kernel keeps its sharding (no gather)."""
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(B, T, N * H)).astype(np.float32))
    module = layers.Linear((3, N, H), ("embed", "qkv", "heads", "kv"))
    params = nn.unbox(module.init(jax.random.key(0), x)["params"])
    cotangent = jnp.asarray(rng.normal(size=(B, T, 3, N, H)).astype(np.float32))

    def loss(p, x):
        return (module.apply({"params": p}, x) * cotangent).sum()

    def reference(p, x):
        return ((jnp.einsum("btd,dknh->btknh", x, p["kernel"]) + p["bias"]) * cotangent).sum()

    expected = jax.grad(reference, argnums=(0, 1))(params, x)
    mesh = make_mesh((2, 1, 2), 4)
    names = ("qkv", "heads", "kv")
    assert not layers.splits_over_mesh(names)  # outside a mesh
    with mesh_context(mesh, DEFAULT_RULES):
        assert layers.splits_over_mesh(names) and not layers.splits_over_mesh(("qkv", "kv"))
        sharded = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)
        hlo = jax.jit(lambda p, x: module.apply({"params": p}, x)).lower(params, x).compile().as_text()
    assert "all-gather" not in hlo  # the kernel's heads axis stays split over `tensor`
    for got in (jax.grad(loss, argnums=(0, 1))(params, x), sharded):
        for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
            np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5)
