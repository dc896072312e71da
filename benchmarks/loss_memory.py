#!/usr/bin/env python
"""Per-device memory of the trainer's contrastive losses, forward + backward, on N virtual CPU devices.

For each loss kind (softmax, sigmoid), variant (gather, ring) and global batch, compiles the value and gradient
with respect to both embeddings (and the scale and bias) of `vlp.losses.contrastive.sharded_contrastive_loss`,
the function the objectives call, and prints one JSON line with the compiled temp + non-aliased output bytes per
device (`compiled.memory_analysis()`). Nothing is executed, so large batches cost compile time only.

  python benchmarks/loss_memory.py [--devices=8] [--dim=1024] [--batches 4096 16384 32768]
                                   [--kinds softmax sigmoid] [--variants gather ring]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=8, help="virtual CPU devices (the batch axis size)")
    parser.add_argument("--dim", type=int, default=1024, help="embedding width D")
    parser.add_argument("--batches", type=int, nargs="*", default=[4096, 16384, 32768], help="global batch sizes")
    parser.add_argument("--kinds", nargs="*", default=["softmax", "sigmoid"], help="loss kinds")
    parser.add_argument("--variants", nargs="*", default=["gather", "ring"], help="sharded variants")
    args = parser.parse_args(argv)
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

    import jax
    import jax.numpy as jnp

    from vlp.losses.contrastive import sharded_contrastive_loss
    from vlp.parallel.mesh import make_mesh

    mesh = make_mesh((-1, 1, 1))
    rows = []
    jobs = [(k, v, b) for k in args.kinds for v in args.variants for b in args.batches]
    for i, (kind, variant, batch) in enumerate(jobs):
        start = time.perf_counter()

        def loss(image, text, scale, bias, kind=kind, variant=variant):
            return sharded_contrastive_loss(kind, image, text, scale, bias, mesh=mesh, variant=variant)[0]

        emb = jax.ShapeDtypeStruct((batch, args.dim), jnp.float32)
        scalar = jax.ShapeDtypeStruct((), jnp.float32)
        grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))
        m = grad.lower(emb, emb, scalar, scalar).compile().memory_analysis()
        per_device = m.temp_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
        row = {"loss": kind, "variant": variant, "global_batch": batch, "devices": args.devices, "dim": args.dim,
               "temp_bytes_per_device": int(m.temp_size_in_bytes), "bytes_per_device": int(per_device),
               "mib_per_device": round(per_device / 2**20, 1)}
        rows.append(row)
        print(json.dumps(row), flush=True)
        print(f"[{i + 1}/{len(jobs)}] {kind}/{variant} B={batch}: compiled in {time.perf_counter() - start:.1f}s",
              file=sys.stderr, flush=True)
    return rows


if __name__ == "__main__":
    main()
