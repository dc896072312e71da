"""Transformer building blocks shared by the image and text towers.

Every parameter is created with logical axis names (`embed`, `mlp`, `heads`, `kv`, `vocab`, `length`, `patch`,
`channels`, `norm`, `qkv`); `vlp.parallel.sharding` maps them to mesh axes through one rule table. Activations
are constrained with (`batch`, `length`, `embed`).

Options that weight export needs exist here from the start: the activation (exact GELU, tanh GELU, QuickGELU),
the LayerNorm epsilon and fused or separate q/k/v projections.
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = jnp.dtype

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    # Exact GELU in torch's form x/2 (1 + erf(x/sqrt 2)): on XLA:CPU erf costs a third less than the erfc of
    # jax.nn.gelu(approximate=False), forward and gradient; the two agree to ~1e-6 (fp32 rounding).
    "gelu": lambda x: 0.5 * x * (1.0 + jax.lax.erf(x * 0.7071067811865476)),
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "relu": jax.nn.relu,
}

default_kernel_init = nn.initializers.xavier_uniform()


def activation_fn(name: str) -> Callable[[jax.Array], jax.Array]:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; valid: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def partitioned(init: Callable, names: tuple[str | None, ...]) -> Callable:
    """An initializer whose parameter carries logical axis names."""
    return nn.with_logical_partitioning(init, names)


def flat_init(init: Callable, num_in_axes: int) -> Callable:
    """Initialises a [*in, *out] kernel as the [prod(in), prod(out)] matrix it acts as (correct fan-in/out)."""

    def wrapped(key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
        flat = (int(np.prod(shape[:num_in_axes])), int(np.prod(shape[num_in_axes:])))
        return init(key, flat, dtype).reshape(shape)

    return wrapped


class Linear(nn.Module):
    """x [..., *in] -> [..., *features] with a kernel [*in, *features] and a bias [*features].

    `names` are the logical names of the kernel's axes (input axes first); the bias takes the output names.
    Written instead of nn.DenseGeneral because DenseGeneral initialises a flattened kernel, which breaks
    logical-partitioning boxes of multi-axis kernels.
    """

    features: tuple[int, ...]
    names: tuple[str | None, ...]
    num_in_axes: int = 1
    use_bias: bool = True
    kernel_init: Callable = default_kernel_init
    bias_init: Callable = nn.initializers.zeros
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        in_shape = x.shape[x.ndim - self.num_in_axes:]
        kernel = self.param("kernel", partitioned(flat_init(self.kernel_init, self.num_in_axes), self.names),
                            tuple(in_shape) + tuple(self.features), jnp.float32)
        contract = tuple(range(x.ndim - self.num_in_axes, x.ndim)), tuple(range(self.num_in_axes))
        y = jax.lax.dot_general(x.astype(self.dtype), kernel.astype(self.dtype), (contract, ((), ())))
        if self.use_bias:
            bias = self.param("bias", partitioned(self.bias_init, self.names[self.num_in_axes:]),
                              tuple(self.features), jnp.float32)
            y = y + bias.astype(self.dtype)
        return y


def constrain(x: jax.Array, names: tuple[str | None, ...]) -> jax.Array:
    """Logical sharding constraint on an activation (a no-op outside a mesh / rule context)."""
    return nn.with_logical_constraint(x, names)


def layer_norm(eps: float, dtype: Dtype, name: str | None = None) -> nn.LayerNorm:
    return nn.LayerNorm(
        epsilon=eps,
        dtype=dtype,
        param_dtype=jnp.float32,
        scale_init=partitioned(nn.initializers.ones, ("norm",)),
        bias_init=partitioned(nn.initializers.zeros, ("norm",)),
        name=name,
    )


def sincos_2d(grid_h: int, grid_w: int, width: int, temperature: float = 10_000.0) -> np.ndarray:
    """Fixed 2-D sine-cosine position embedding (MoCo v3 / big_vision form), [grid_h * grid_w, width]."""
    if width % 4:
        raise ValueError(f"sincos2d position embedding needs a width divisible by 4, got {width}")
    y, x = np.mgrid[:grid_h, :grid_w]
    omega = 1.0 / temperature ** (np.arange(width // 4) / (width // 4 - 1 if width > 4 else 1))
    y = np.einsum("m,d->md", y.flatten(), omega)
    x = np.einsum("m,d->md", x.flatten(), omega)
    return np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1).astype(np.float32)


class Attention(nn.Module):
    """Multi-head self-attention (or cross-attention when `kv_inputs` is given).

    Inputs [B, T, D] -> [B, T, D]. `mask` is a boolean [B, 1|heads, T, S] (True = attend); `causal` adds the
    lower-triangular mask. With `fused_qkv` one kernel [D, 3, heads, head_dim] computes q, k and v (as in
    open_clip's `in_proj_weight`), else three kernels [D, heads, head_dim].
    """

    num_heads: int
    fused_qkv: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None = None, causal: bool = False) -> jax.Array:
        width = x.shape[-1]
        if width % self.num_heads:
            raise ValueError(f"attention width {width} is not divisible by num_heads {self.num_heads}")
        head_dim = width // self.num_heads
        dense = lambda features, names, name: Linear(  # noqa: E731
            features, ("embed",) + names, dtype=self.dtype, name=name)
        if self.fused_qkv:
            qkv = dense((3, self.num_heads, head_dim), ("qkv", "heads", "kv"), "qkv")(x)
            q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        else:
            q = dense((self.num_heads, head_dim), ("heads", "kv"), "query")(x)
            k = dense((self.num_heads, head_dim), ("heads", "kv"), "key")(x)
            v = dense((self.num_heads, head_dim), ("heads", "kv"), "value")(x)
        out = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal)
        return Linear((width,), ("heads", "kv", "embed"), num_in_axes=2, dtype=self.dtype, name="out")(out)


class Mlp(nn.Module):
    """Transformer MLP: [B, T, D] -> [B, T, mlp_dim] -> [B, T, D]."""

    mlp_dim: int
    activation: str = "gelu"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        width = x.shape[-1]
        h = Linear((self.mlp_dim,), ("embed", "mlp"), bias_init=nn.initializers.normal(1e-6), dtype=self.dtype,
                   name="fc1")(x)
        h = constrain(activation_fn(self.activation)(h), ("batch", "length", "mlp"))
        return Linear((width,), ("mlp", "embed"), bias_init=nn.initializers.normal(1e-6), dtype=self.dtype,
                      name="fc2")(h)


class EncoderBlock(nn.Module):
    """Pre-LN transformer block: x + attn(ln(x)); x + mlp(ln(x)). [B, T, D] -> [B, T, D]."""

    num_heads: int
    mlp_dim: int
    activation: str = "gelu"
    ln_eps: float = 1e-6
    fused_qkv: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None = None, causal: bool = False) -> jax.Array:
        x = constrain(x, ("batch", "length", "embed"))
        y = layer_norm(self.ln_eps, self.dtype, "ln_1")(x)
        y = Attention(self.num_heads, self.fused_qkv, self.dtype, name="attn")(y, mask=mask, causal=causal)
        x = x + y
        y = layer_norm(self.ln_eps, self.dtype, "ln_2")(x)
        y = Mlp(self.mlp_dim, self.activation, self.dtype, name="mlp")(y)
        return constrain(x + y, ("batch", "length", "embed"))


class Encoder(nn.Module):
    """A stack of `depth` pre-LN blocks, [B, T, D] -> [B, T, D] (no final norm: the towers own it)."""

    depth: int
    num_heads: int
    mlp_dim: int
    activation: str = "gelu"
    ln_eps: float = 1e-6
    fused_qkv: bool = True
    remat: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None = None, causal: bool = False) -> jax.Array:
        block_cls = nn.remat(EncoderBlock, static_argnums=(3,)) if self.remat else EncoderBlock
        for i in range(self.depth):
            x = block_cls(
                self.num_heads, self.mlp_dim, self.activation, self.ln_eps, self.fused_qkv, self.dtype,
                name=f"block_{i}",
            )(x, mask, causal)
        return x


class MapHead(nn.Module):
    """Multihead attention pooling with a learned probe (SigLIP's MAP head): [B, T, D] -> [B, D]."""

    num_heads: int
    mlp_dim: int
    activation: str = "gelu"
    ln_eps: float = 1e-6
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        batch, _, width = x.shape
        probe = self.param("probe", partitioned(nn.initializers.xavier_uniform(), (None, None, "embed")),
                           (1, 1, width), jnp.float32)
        probe = jnp.broadcast_to(probe.astype(self.dtype), (batch, 1, width))
        head_dim = width // self.num_heads
        dense = lambda name: Linear(  # noqa: E731
            (self.num_heads, head_dim), ("embed", "heads", "kv"), dtype=self.dtype, name=name)
        q, k, v = dense("query")(probe), dense("key")(x), dense("value")(x)
        y = jax.nn.dot_product_attention(q, k, v)
        y = Linear((width,), ("heads", "kv", "embed"), num_in_axes=2, dtype=self.dtype, name="out")(y)
        y = y + Mlp(self.mlp_dim, self.activation, self.dtype, name="mlp")(
            layer_norm(self.ln_eps, self.dtype, "ln")(y))
        return y[:, 0]
