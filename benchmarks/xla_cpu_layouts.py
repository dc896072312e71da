#!/usr/bin/env python
"""Three XLA:CPU costs behind vlp's CPU defaults, each shown by a minimal JAX program, as one JSON line.

- `weight_gradient`: the gradient of a dense layer's kernel, y = x @ w with x [B, T, D], computed with two row axes
  (x as [B, T, D]) and with one (x reshaped to [B*T, D] first, what `vlp.models.layers.Linear` does). With two,
  XLA:CPU contracts two axes (in a whole model it also copies the activation gradient into a transposed layout).
- `attention`: forward + backward of softmax(q k^T / sqrt(H)) v for q, k, v [B, T, N, H], with
  `jax.nn.dot_product_attention(implementation="xla")` (token-major einsums), and with
  `vlp.models.layers.head_major_attention` (heads first, what the models use on CPU) under autodiff's backward and
  under its own (the default: every batched matmul with its left operand contracting the minor axis, the form
  XLA:CPU hands to YNNPACK).
- `page_faults`: minor page faults of one jitted elementwise op on a [B*T, F] array in this process (34 MB on the
  bench dims, above glibc's 32 MiB mmap threshold): ~1 per 4 KiB under glibc's defaults, ~0 under vlp's malloc
  settings (`vlp/host_malloc.py`, applied when this script runs as a program; `VLP_HOST_MALLOC=default` compares).

Defaults are the bench ViT's shapes (`configs/clip.py:bench`: batch 128, 65 tokens, width 256, MLP 1024, 4 heads).

  python benchmarks/xla_cpu_layouts.py [--batch 128] [--tokens 65] [--width 256] [--features 1024] [--heads 4]
      [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any, Callable

from xla_cpu_threads import minor_page_faults, time_op  # a sibling script: benchmarks/ is on sys.path as a program


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=65)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--features", type=int, default=1024, help="the dense layer's output width (the MLP's)")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    if min(args.batch, args.tokens, args.width, args.features, args.heads, args.repeats) < 1:
        raise SystemExit(f"every size must be >= 1: {vars(args)}")
    if args.width % args.heads:
        raise SystemExit(f"--width={args.width} must be divisible by --heads={args.heads}")

    import jax
    import jax.numpy as jnp

    from vlp.models.layers import head_major_attention

    def ms(fn: Callable, fn_args: tuple, repeats: int) -> float:
        return float(f"{1e3 * time_op(fn, fn_args, repeats)[0]:.4g}")  # median wall ms after a warm-up run

    b, t, d, f, n = args.batch, args.tokens, args.width, args.features, args.heads
    keys = jax.random.split(jax.random.key(0), 6)
    x = jax.random.normal(keys[0], (b, t, d))
    w = jax.random.normal(keys[1], (d, f)) / d ** 0.5
    cotangent = jax.random.normal(keys[2], (b, t, f))
    result: dict[str, Any] = {"batch": b, "tokens": t, "width": d, "features": f, "heads": n,
                              "jax": jax.__version__, "cpu_count": os.cpu_count(),
                              "glibc_tunables": os.environ.get("GLIBC_TUNABLES", "")}

    # First, before other work leaves free blocks in the heap that could serve it.
    z = jnp.ones((b * t, f))
    scale_add = jax.jit(lambda a: 2.0 * a + 1.0)
    jax.block_until_ready(scale_add(z))
    faults = []
    for _ in range(max(args.repeats, 30)):  # freed buffers return asynchronously: the heap settles within ~13 runs
        before = minor_page_faults()
        jax.block_until_ready(scale_add(z))
        faults.append(minor_page_faults() - before)
    result["page_faults"] = {"array_bytes": int(z.nbytes), "minor_faults_per_run_min": min(faults),
                             "minor_faults_per_run_max": max(faults)}

    def dense_loss(rows_3d: bool) -> Callable:
        def loss(w, x):
            y = jax.lax.dot_general(x, w, (((2,), (0,)), ((), ()))) if rows_3d else (
                x.reshape(b * t, d) @ w).reshape(b, t, f)
            return (y * cotangent).sum()
        return jax.jit(jax.grad(loss))

    weight_gradient = {}
    for name, rows_3d in (("rows_3d", True), ("rows_2d", False)):
        grad = dense_loss(rows_3d)
        weight_gradient[name] = {"ms": ms(grad, (w, x), args.repeats)}
    result["weight_gradient"] = weight_gradient

    q, k, v = (jax.random.normal(key, (b, t, n, d // n)) for key in keys[3:6])
    head_cotangent = jnp.ones((b, t, n, d // n))
    attention = {}
    for name, attend in (("token_major", lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="xla")),
                         ("head_major_autodiff", lambda q, k, v: head_major_attention(q, k, v, custom_backward=False)),
                         ("head_major", head_major_attention)):
        grad = jax.jit(jax.grad(lambda q, k, v: (attend(q, k, v) * head_cotangent).sum(), argnums=(0, 1, 2)))
        attention[name] = {"forward_ms": ms(jax.jit(attend), (q, k, v), args.repeats),
                           "forward_backward_ms": ms(grad, (q, k, v), args.repeats)}
    result["attention"] = attention

    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    from vlp.host_malloc import reexec_with_malloc_tunables

    reexec_with_malloc_tunables()
    main()
