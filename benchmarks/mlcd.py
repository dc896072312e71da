#!/usr/bin/env python
"""MLCD at cluster scale on N virtual CPU devices: the class centres' memory per device, and k-means throughput.

1. Memory: compiles (never runs) the value and gradient of `sharded_mlcd_loss` (what the mlcd objective calls) for
   K centres x D on a (1, N, 1) mesh, the centres sharded on fsdp, and prints one JSON line with the centres'
   bytes per device (array size, and x3 with Adam's two moments), the same replicated, and the compiled temp +
   output bytes of the loss step per device (`compiled.memory_analysis()`).
2. Throughput: Lloyd passes of `vlp.data.kmeans.KMeans` (centres sharded over the N devices) over random
   normalised embeddings; prints embeddings/s per pass and of the top-k label assignment.

  python benchmarks/mlcd.py [--devices=8] [--centres=1000000] [--dim=512] [--batch=4096] [--sample_ratio=0.1]
                            [--kmeans_n=200000] [--kmeans_k=4096] [--kmeans_dim=512] [--iterations=2]
"""

from __future__ import annotations

import argparse
import json
import os
import time


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=8, help="virtual CPU devices (the fsdp axis)")
    parser.add_argument("--centres", type=int, default=1_000_000, help="K")
    parser.add_argument("--dim", type=int, default=512, help="D")
    parser.add_argument("--batch", type=int, default=4096, help="global batch of the compiled loss step")
    parser.add_argument("--positives", type=int, default=10)
    parser.add_argument("--sample_ratio", type=float, default=0.1)
    parser.add_argument("--kmeans_n", type=int, default=200_000, help="embeddings clustered (0: skip)")
    parser.add_argument("--kmeans_k", type=int, default=4096)
    parser.add_argument("--kmeans_dim", type=int, default=512)
    parser.add_argument("--iterations", type=int, default=2)
    args = parser.parse_args(argv)
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

    import jax
    import jax.numpy as jnp
    import numpy as np

    from vlp.data.kmeans import KMeans
    from vlp.losses.cluster_discrimination import sharded_mlcd_loss
    from vlp.parallel.mesh import make_mesh

    rows = []
    mesh = make_mesh((1, -1, 1))
    start = time.perf_counter()
    with jax.set_mesh(mesh):
        def loss(emb, centres, positives, rng):
            return sharded_mlcd_loss(emb, centres, positives, rng, sample_ratio=args.sample_ratio)[0]

        shapes = (jax.ShapeDtypeStruct((args.batch, args.dim), jnp.float32),
                  jax.ShapeDtypeStruct((args.centres, args.dim), jnp.float32),
                  jax.ShapeDtypeStruct((args.batch, args.positives), jnp.int32),
                  jax.eval_shape(lambda: jax.random.key(0)))
        compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(*shapes).compile()
        m = compiled.memory_analysis()
    centre_bytes = args.centres * args.dim * 4
    row = {"bench": "mlcd_centres_memory", "devices": args.devices, "centres": args.centres, "dim": args.dim,
           "global_batch": args.batch, "sample_ratio": args.sample_ratio,
           "centres_mib_per_device": round(centre_bytes / args.devices / 2**20, 1),
           "centres_with_adam_mib_per_device": round(3 * centre_bytes / args.devices / 2**20, 1),
           "replicated_centres_with_adam_mib": round(3 * centre_bytes / 2**20, 1),
           "loss_step_temp_mib_per_device": round(m.temp_size_in_bytes / 2**20, 1),
           "loss_step_output_mib_per_device": round((m.output_size_in_bytes - m.alias_size_in_bytes) / 2**20, 1),
           "compile_seconds": round(time.perf_counter() - start, 1)}
    rows.append(row)
    print(json.dumps(row), flush=True)

    if args.kmeans_n:
        rng = np.random.default_rng(0)
        x = rng.normal(size=(args.kmeans_n, args.kmeans_dim)).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        chunk = 16_384
        kmeans = KMeans(args.kmeans_k, args.kmeans_dim)
        kmeans.init_from(x[:args.kmeans_k])
        chunks = lambda: (x[i:i + chunk] for i in range(0, len(x), chunk))  # noqa: E731
        kmeans.fit(chunks, 1, lambda: x[:args.kmeans_k])  # compile
        start = time.perf_counter()
        kmeans.fit(chunks, args.iterations, lambda: x[:args.kmeans_k])
        fit_seconds = time.perf_counter() - start
        kmeans.assign(x[:chunk], 10)  # compile
        start = time.perf_counter()
        for c in chunks():
            kmeans.assign(c, 10)
        assign_seconds = time.perf_counter() - start
        row = {"bench": "kmeans_throughput", "devices": args.devices, "backend": jax.default_backend(),
               "n": args.kmeans_n, "k": args.kmeans_k, "dim": args.kmeans_dim, "iterations": args.iterations,
               "pass_embeddings_per_second": round(args.kmeans_n * args.iterations / fit_seconds),
               "top10_assign_embeddings_per_second": round(args.kmeans_n / assign_seconds)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


if __name__ == "__main__":
    main()
