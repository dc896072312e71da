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


def splits_over_mesh(names: tuple[str | None, ...]) -> bool:
    """Whether the current logical-axis rules map any of these logical axes to a mesh axis of size > 1 in the
    current (abstract) mesh; False outside a mesh."""
    mesh_shape = jax.sharding.get_abstract_mesh().shape
    for axes in nn.logical_to_mesh_axes(names):
        for axis in (axes if isinstance(axes, tuple) else (axes,)):
            if axis is not None and mesh_shape.get(axis, 1) > 1:
                return True
    return False


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
        # Rows and output features are flattened (free reshapes) so the kernel's gradient is a plain 2-D matmul:
        # with two row axes (batch, length) or several output axes (qkv's 3 x heads x head_dim) XLA:CPU first
        # copies the whole activation gradient into a transposed layout, once per layer (benchmarks/train_step.py
        # on clip.py:bench: 2.20 -> 2.03 s/step, same numbers). Output axes a mesh axis splits stay unflattened:
        # merging them would make GSPMD gather the kernel.
        lead = x.shape[:x.ndim - self.num_in_axes]
        rows = x.reshape((-1,) + tuple(in_shape)).astype(self.dtype)
        kernel = kernel.astype(self.dtype)
        if len(self.features) > 1 and not splits_over_mesh(self.names[self.num_in_axes:]):
            kernel = kernel.reshape(tuple(in_shape) + (-1,))
        contract = tuple(range(1, 1 + self.num_in_axes)), tuple(range(self.num_in_axes))
        y = jax.lax.dot_general(rows, kernel, (contract, ((), ())))
        y = y.reshape(tuple(lead) + tuple(self.features))
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


# model.attention: which kernel computes softmax(q k^T / sqrt(d) + mask) v. `auto` follows the backend.
ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "cudnn", "splash")
_KERNEL_BACKENDS = {"cudnn": ("cuda", "an NVIDIA GPU"), "splash": ("tpu", "a TPU")}
_HALF_DTYPES = ("bfloat16", "float16")


def attention_backend() -> str:
    """jax's default backend, with NVIDIA ("cuda") and AMD ("rocm") GPUs told apart (both are "gpu" to jax)."""
    backend = jax.default_backend()
    if backend == "gpu":
        version = str(getattr(jax.devices()[0].client, "platform_version", "")).lower()
        return "rocm" if "rocm" in version else "cuda"
    return backend


def resolve_attention(name: str, backend: str, dtype: str | Dtype = "auto", head_dim: int | None = None) -> str:
    """The implementation `name` means on `backend` (`attention_backend()`) for compute `dtype` ("auto" = bf16
    off CPU): `auto` picks cuDNN flash attention on NVIDIA GPUs (bf16/fp16, head_dim a multiple of 8 up to 128),
    the Pallas splash kernel on TPU, else XLA. An explicit kernel that the backend or dtype cannot run raises a
    ValueError naming the backend and the valid choices.
    """
    if name not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {name!r}; valid: {ATTENTION_IMPLEMENTATIONS}")
    if str(dtype) == "auto":
        dtype = "float32" if backend == "cpu" else "bfloat16"
    dtype = str(jnp.dtype(dtype))
    if name == "auto":
        if backend == "cuda":
            flash_ok = dtype in _HALF_DTYPES and (head_dim is None or (head_dim % 8 == 0 and head_dim <= 128))
            return "cudnn" if flash_ok else "xla"
        return "splash" if backend == "tpu" else "xla"
    if name in _KERNEL_BACKENDS and backend != _KERNEL_BACKENDS[name][0]:
        valid = ["auto", "xla"] + [k for k, (b, _) in _KERNEL_BACKENDS.items() if b == backend]
        raise ValueError(f"attention implementation {name!r} needs {_KERNEL_BACKENDS[name][1]} but the JAX backend "
                         f"is {backend!r}; valid on {backend}: {valid}")
    if name == "cudnn" and dtype not in _HALF_DTYPES:
        raise ValueError(f"attention implementation 'cudnn' computes in bf16/fp16 only, but the compute dtype is "
                         f"{dtype}; set precision.compute_dtype='bfloat16' (or 'auto'), or use 'xla'")
    return name


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None, causal: bool = False,
                     interpret: bool = False) -> jax.Array:
    """TPU splash attention (jax.experimental.pallas.ops.tpu.splash_attention) with jax.nn.dot_product_attention's
    interface: q [B, T, N, H], k, v [B, S, N, H] -> [B, T, N, H]; `mask` a key-padding mask [B, 1, 1, S] (True =
    attend, as the text tower's); `causal` the lower-triangular mask. `interpret=True` runs the kernel in the
    Pallas interpreter (any backend: tests).

    The kernel takes [N, T, H] per example, does not scale q and needs lengths in multiples of its 128 blocks:
    q is scaled by 1/sqrt(H), T and S are padded, and padded or masked keys get another segment id than the
    queries (splash's segment ids: a query attends to keys of its own id). Under a mesh the kernel runs in a
    shard_map over the batch and heads axes of the logical rule table (a Pallas call is not auto-partitioned).
    """
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    batch, q_len, _, head_dim = q.shape
    kv_len = k.shape[1]
    if mask is not None and (mask.ndim != 4 or mask.shape[1:3] != (1, 1)):
        raise ValueError(f"splash attention supports key-padding masks [B, 1, 1, S] and causal masks, got a mask of "
                         f"shape {mask.shape}; use model.attention='xla'")
    block = 128  # BlockSizes.get_default()
    pad = lambda x: jnp.pad(x, ((0, 0), (0, -x.shape[1] % block), (0, 0), (0, 0)))  # noqa: E731  (the length axis)
    q_p, k_p, v_p = pad(q * jnp.asarray(1.0 / np.sqrt(head_dim), q.dtype)), pad(k), pad(v)
    key_valid = jnp.ones((batch, kv_len), bool) if mask is None else jnp.broadcast_to(mask[:, 0, 0], (batch, kv_len))
    kv_ids = jnp.pad(key_valid.astype(jnp.int32), ((0, 0), (0, k_p.shape[1] - kv_len)))
    q_ids = jnp.ones((batch, q_p.shape[1]), jnp.int32)
    to_heads_first = lambda x: x.transpose(0, 2, 1, 3)  # noqa: E731

    def local(q_p, k_p, v_p, q_ids, kv_ids):
        shape = (q_p.shape[1], k_p.shape[1])
        one = splash.CausalMask(shape) if causal else splash.FullMask(shape)
        kernel = splash.make_splash_mha(splash.MultiHeadMask([one] * q_p.shape[2]), head_shards=1, q_seq_shards=1,
                                        interpret=interpret)
        out = jax.vmap(lambda q1, k1, v1, qi, ki: kernel(q1, k1, v1, segment_ids=splash.SegmentIds(qi, ki)))(
            to_heads_first(q_p), to_heads_first(k_p), to_heads_first(v_p), q_ids, kv_ids)
        return to_heads_first(out)

    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        out = local(q_p, k_p, v_p, q_ids, kv_ids)
    else:
        qkv_spec = nn.logical_to_mesh_axes(("batch", None, "heads", None))
        ids_spec = nn.logical_to_mesh_axes(("batch", None))
        out = jax.shard_map(local, mesh=mesh, in_specs=(qkv_spec,) * 3 + (ids_spec,) * 2, out_specs=qkv_spec,
                            check_vma=False)(q_p, k_p, v_p, q_ids, kv_ids)
    return out[:, :q_len]


def _large_negative(dtype: Dtype) -> float:
    """jax.nn.dot_product_attention's stand-in for -inf at masked logits: -0.7 x the dtype's largest value."""
    return -0.7 * min(float(jnp.finfo(dtype).max), float(jnp.finfo(jnp.float32).max))


def _head_major_probs(qh: jax.Array, kh: jax.Array, mask: jax.Array | None) -> jax.Array:
    """Softmax attention weights [B, N, T, S] of heads-first qh [B, N, T, H] and kh [B, N, S, H], in kh's dtype:
    fp32 logits for bf16 inputs and an fp32 softmax, as jax's XLA path."""
    logits_dtype = jnp.promote_types(qh.dtype, jnp.float32)
    logits = jnp.einsum("bnth,bnsh->bnts", qh, kh, preferred_element_type=logits_dtype)
    logits = logits * jnp.asarray(qh.shape[-1] ** -0.5, logits_dtype)
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.asarray(_large_negative(logits_dtype), logits_dtype))
    return jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(kh.dtype)


def _materialized_transpose(x: jax.Array) -> jax.Array:
    """x [..., T, S] -> a real [..., S, T] copy. The barrier keeps XLA from folding the transpose back into the
    dot that reads it: XLA:CPU hands a batched dot to YNNPACK only when the left operand contracts its minor axis,
    and runs the others on its own batched dot (~35 GFLOP/s on the bench step's attention shapes)."""
    return jax.lax.optimization_barrier(jnp.swapaxes(x, -1, -2))


def _head_major_core_autodiff(qh: jax.Array, kh: jax.Array, vh: jax.Array, mask: jax.Array | None) -> jax.Array:
    """softmax(q k^T / sqrt(H)) v, heads first: [B, N, T, H] -> [B, N, T, H]."""
    return jnp.einsum("bnts,bnsh->bnth", _head_major_probs(qh, kh, mask), vh)


_head_major_core = jax.custom_vjp(_head_major_core_autodiff)  # the same values, the backward below


def _head_major_core_forward(qh, kh, vh, mask):
    probs = _head_major_probs(qh, kh, mask)
    return jnp.einsum("bnts,bnsh->bnth", probs, vh), (qh, kh, vh, mask, probs)


def _head_major_core_backward(residuals, out_grad):
    """The gradients autodiff gives, with dV = P^T dO and dK = dS^T Q read from transposed copies of P and dS."""
    qh, kh, vh, mask, probs = residuals
    v_grad = jnp.einsum("bnst,bnth->bnsh", _materialized_transpose(probs), out_grad)
    probs_grad = jnp.einsum("bnth,bnsh->bnts", out_grad, vh).astype(jnp.float32)
    probs32 = probs.astype(jnp.float32)
    logits_grad = probs32 * (probs_grad - jnp.sum(probs_grad * probs32, axis=-1, keepdims=True))
    if mask is not None:  # autodiff through jnp.where: masked logits get no gradient, even in fully masked rows
        logits_grad = jnp.where(mask, logits_grad, 0.0)
    logits_dtype = jnp.promote_types(qh.dtype, jnp.float32)
    logits_grad = logits_grad.astype(logits_dtype) * jnp.asarray(qh.shape[-1] ** -0.5, logits_dtype)
    q_grad = jnp.einsum("bnts,bnsh->bnth", logits_grad, kh.astype(logits_dtype))
    k_grad = jnp.einsum("bnst,bnth->bnsh", _materialized_transpose(logits_grad), qh.astype(logits_dtype))
    return q_grad.astype(qh.dtype), k_grad.astype(kh.dtype), v_grad.astype(vh.dtype), None


_head_major_core.defvjp(_head_major_core_forward, _head_major_core_backward)


def head_major_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None,
                         causal: bool = False, custom_backward: bool = True) -> jax.Array:
    """jax.nn.dot_product_attention's XLA computation (same scaling, masking with -0.7 * the dtype's max, fp32
    softmax) with heads moved before tokens first: q [B, T, N, H], k and v [B, S, N, H], boolean `mask`
    broadcastable to [B, N, T, S] (True = attend) -> [B, T, N, H]. XLA:CPU runs the [B, N, ...] batched matmuls
    faster than jax's token-major einsums, and `custom_backward` (the default) computes autodiff's gradients with
    every batched matmul in the form XLA:CPU gives YNNPACK. Forward + backward of the bench ViT's attention
    (B 128, T 65, N 4, H 64), ms per layer (benchmarks/xla_cpu_layouts.py, 3 runs): token-major 34.5-36.8,
    heads-first 26.6-26.8, heads-first with the custom backward 25.1-26.9; in the whole bench step the custom
    backward saves ~0.035 s of ~1.95 (paired runs).
    """
    qh, kh, vh = (x.transpose(0, 2, 1, 3) for x in (q, k, v))
    if causal:
        tril = jnp.tril(jnp.ones((q.shape[1], k.shape[1]), bool))
        mask = tril if mask is None else jnp.logical_and(mask, tril)
    core = _head_major_core if custom_backward else _head_major_core_autodiff
    return core(qh, kh, vh, mask).transpose(0, 2, 1, 3)


class Attention(nn.Module):
    """Multi-head self-attention (or cross-attention when `kv_inputs` is given).

    Inputs [B, T, D] -> [B, T, D]. `mask` is a boolean [B, 1|heads, T, S] (True = attend); `causal` adds the
    lower-triangular mask. With `fused_qkv` one kernel [D, 3, heads, head_dim] computes q, k and v (as in
    open_clip's `in_proj_weight`), else three kernels [D, heads, head_dim]. `implementation`: one of
    `ATTENTION_IMPLEMENTATIONS` (`resolve_attention` says what `auto` is on this backend); all compute the same
    function (cuDNN through `jax.nn.dot_product_attention(implementation="cudnn")`, layout [B, T, N, H], a boolean
    mask becoming an additive bias; splash: `splash_attention`).
    """

    num_heads: int
    fused_qkv: bool = True
    dtype: Dtype = jnp.float32
    implementation: str = "auto"

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
        implementation = resolve_attention(self.implementation, attention_backend(), self.dtype, head_dim)
        if implementation == "splash":
            out = splash_attention(q, k, v, mask, causal)
        elif implementation == "xla" and attention_backend() == "cpu":
            out = head_major_attention(q, k, v, mask, causal)
        else:
            out = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal, implementation=implementation)
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
    attention: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None = None, causal: bool = False) -> jax.Array:
        return self._forward(x, mask, causal)

    def _forward(self, x: jax.Array, mask: jax.Array | None, causal: bool) -> jax.Array:
        x = constrain(x, ("batch", "length", "embed"))
        y = layer_norm(self.ln_eps, self.dtype, "ln_1")(x)
        y = Attention(self.num_heads, self.fused_qkv, self.dtype, self.attention, name="attn")(y, mask=mask,
                                                                                               causal=causal)
        x = x + y
        y = layer_norm(self.ln_eps, self.dtype, "ln_2")(x)
        y = Mlp(self.mlp_dim, self.activation, self.dtype, name="mlp")(y)
        return constrain(x + y, ("batch", "length", "embed"))


REMAT_POLICIES = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable", "offload_dots")


def remat_policy_fn(name: str) -> Callable | None:
    """The `jax.checkpoint` policy of a `remat_policy` name (None for "full": save nothing, recompute the block).

    `offload_dots` keeps the matmul outputs without batch dimensions in pinned host memory instead of recomputing
    them; it needs a backend with a `pinned_host` memory space (TPU, GPU)."""
    if name not in REMAT_POLICIES:
        raise ValueError(f"unknown remat policy {name!r}; valid: {REMAT_POLICIES}")
    if name == "offload_dots":
        kinds = {m.kind for m in jax.devices()[0].addressable_memories()}
        platform = jax.devices()[0].platform
        if "pinned_host" not in kinds or platform == "cpu":
            raise ValueError(f"remat policy 'offload_dots' needs host offload (a pinned_host memory space on a GPU "
                             f"or TPU); the {platform} backend has none usable; valid here: "
                             f"{REMAT_POLICIES[:-1]}")
        return jax.checkpoint_policies.offload_dot_with_no_batch_dims("device", "pinned_host")
    return {"none": None, "full": None, "dots_saveable": jax.checkpoint_policies.dots_saveable,
            "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}[name]


class _ScanBlock(EncoderBlock):
    """An EncoderBlock in `nn.scan`'s (carry, x) -> (carry, y) form; `causal` is an attribute (a static bool)."""

    causal: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None) -> tuple[jax.Array, None]:
        return self._forward(x, mask, self.causal), None


class Encoder(nn.Module):
    """A stack of `depth` pre-LN blocks, [B, T, D] -> [B, T, D] (no final norm: the towers own it).

    `scan=False`: blocks `block_0` ... `block_{depth-1}`, each compiled. `scan=True`: one block under `nn.scan`,
    params `blocks/...` with a leading [depth] axis (logical name `layers`); `vlp.models.layout` converts between
    the two. `remat_policy` (REMAT_POLICIES) chooses what each block keeps for the backward pass.
    """

    depth: int
    num_heads: int
    mlp_dim: int
    activation: str = "gelu"
    ln_eps: float = 1e-6
    fused_qkv: bool = True
    remat_policy: str = "none"
    dtype: Dtype = jnp.float32
    attention: str = "auto"  # Attention.implementation
    scan: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None = None, causal: bool = False) -> jax.Array:
        policy = remat_policy_fn(self.remat_policy)
        kwargs = dict(num_heads=self.num_heads, mlp_dim=self.mlp_dim, activation=self.activation, ln_eps=self.ln_eps,
                      fused_qkv=self.fused_qkv, dtype=self.dtype, attention=self.attention)
        if self.scan:
            block_cls = _ScanBlock
            if self.remat_policy != "none":  # prevent_cse=False: scan already stops XLA merging the recomputation
                block_cls = nn.remat(block_cls, policy=policy, prevent_cse=False)
            blocks = nn.scan(block_cls, variable_axes={"params": 0}, split_rngs={"params": True},
                             in_axes=nn.broadcast, length=self.depth,
                             metadata_params={nn.PARTITION_NAME: "layers"})
            x, _ = blocks(**kwargs, causal=causal, name="blocks")(x, mask)
            return x
        block_cls = EncoderBlock
        if self.remat_policy != "none":
            block_cls = nn.remat(EncoderBlock, policy=policy, static_argnums=(3,))
        for i in range(self.depth):
            x = block_cls(**kwargs, name=f"block_{i}")(x, mask, causal)
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
