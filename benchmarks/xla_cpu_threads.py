#!/usr/bin/env python
"""How many cores XLA:CPU keeps busy per kind of op, as one JSON line: a matmul vs the elementwise work of a
transformer block (exact GELU and its gradient, LayerNorm, a scaled add), each jitted alone on the bench ViT's
activation shape ([128 x 65 tokens, 1024] for the MLP, [8320, 256] for the norm).

For each op: the median wall time, the process CPU time over the same runs divided by the wall time (`cores_busy`:
~1 means one thread did the work while the others waited, ~N means N cores worked), and GFLOP/s or GB/s. On a
loaded machine both shrink; the ratio between a matmul and an elementwise op is the figure to read.

  python benchmarks/xla_cpu_threads.py [--tokens 8320] [--width 256] [--mlp 1024] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Any, Callable


def minor_page_faults() -> int:
    """This process's minor page faults so far: each first touch of freshly mapped memory costs one (4 KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def time_op(fn: Callable, args: tuple, repeats: int, reduce: Callable = statistics.median) -> tuple[float, float]:
    """(`reduce` of the wall seconds (their median unless told), process CPU seconds / wall seconds) over `repeats`
    runs after one warm-up run."""
    import jax

    jax.block_until_ready(fn(*args))
    walls, cpus = [], []
    for _ in range(repeats):
        cpu, wall = time.process_time(), time.perf_counter()
        jax.block_until_ready(fn(*args))
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return reduce(walls), sum(cpus) / sum(walls)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=128 * 65, help="rows: batch x sequence length")
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--mlp", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    if min(args.tokens, args.width, args.mlp, args.repeats) < 1:
        raise SystemExit(f"--tokens={args.tokens}, --width={args.width}, --mlp={args.mlp} and "
                         f"--repeats={args.repeats} must be >= 1")

    import jax
    import jax.numpy as jnp

    n, d, h = args.tokens, args.width, args.mlp
    keys = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(keys[0], (n, d))
    w = jax.random.normal(keys[1], (d, h)) / d ** 0.5
    z = jax.random.normal(keys[2], (n, h))
    from vlp.models.layers import activation_fn

    gelu = activation_fn("gelu")  # the models' exact GELU
    layer_norm = lambda t: (t - t.mean(-1, keepdims=True)) * jax.lax.rsqrt(t.var(-1, keepdims=True) + 1e-6)  # noqa
    ops = {  # name: (function, args, FLOPs or None, bytes moved)
        "matmul": (jnp.matmul, (x, w), 2 * n * d * h, 4 * (n * d + d * h + n * h)),
        "gelu_exact": (gelu, (z,), None, 8 * n * h),
        "gelu_exact_grad": (jax.grad(lambda t: gelu(t).sum()), (z,), None, 8 * n * h),
        "layer_norm": (layer_norm, (x,), None, 8 * n * d),
        "scale_add": (lambda t: 2.0 * t + 1.0, (z,), None, 8 * n * h),
    }
    result: dict[str, Any] = {"tokens": n, "width": d, "mlp": h, "cpu_count": os.cpu_count(),
                              "jax": jax.__version__, "xla_flags": os.environ.get("XLA_FLAGS", "")}
    for name, (fn, fn_args, flops, nbytes) in ops.items():
        seconds, cores = time_op(jax.jit(fn), fn_args, args.repeats)
        result[name] = {"ms": float(f"{1e3 * seconds:.4g}"), "cores_busy": round(cores, 2),
                        "gflops": float(f"{flops / seconds / 1e9:.4g}") if flops else None,
                        "gbytes_per_s": float(f"{nbytes / seconds / 1e9:.4g}")}
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
