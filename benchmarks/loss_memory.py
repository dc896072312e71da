#!/usr/bin/env python
"""Per-device memory of the sharded contrastive loss, forward + backward, on N virtual CPU devices.

Reports the compiled temp + non-aliased output bytes per device (`compiled.memory_analysis()`) of the loss and its
gradient with respect to both embeddings, for each variant and global batch, one JSON line each.

  python benchmarks/loss_memory.py [--devices=8] [--dim=1024] [--batches 4096 16384 32768]
"""

from __future__ import annotations

import argparse
import json
import os


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=8, help="virtual CPU devices (the batch axis size)")
    parser.add_argument("--dim", type=int, default=1024, help="embedding width D")
    parser.add_argument("--batches", type=int, nargs="*", default=[4096, 16384, 32768], help="global batch sizes")
    args = parser.parse_args(argv)
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

    import jax
    import jax.numpy as jnp

    from vlp.losses.contrastive import SOFTMAX_VARIANTS, sharded_softmax_contrastive_loss
    from vlp.parallel.mesh import make_mesh

    mesh = make_mesh((-1, 1, 1))
    rows = []
    for variant in sorted(SOFTMAX_VARIANTS):
        for batch in args.batches:
            def loss(image, text, variant=variant):
                return sharded_softmax_contrastive_loss(image, text, jnp.float32(10.0), mesh=mesh,
                                                        variant=variant)[0]

            spec = jax.ShapeDtypeStruct((batch, args.dim), jnp.float32)
            compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(spec, spec).compile()
            m = compiled.memory_analysis()
            per_device = m.temp_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
            row = {"loss": "softmax", "variant": variant, "devices": args.devices, "global_batch": batch,
                   "dim": args.dim, "bytes_per_device": int(per_device),
                   "mib_per_device": round(per_device / 2**20, 1)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


if __name__ == "__main__":
    main()
