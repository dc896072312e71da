#!/usr/bin/env python
"""Compile time and compiled memory of the trainer's train step, with and without `model.scan_layers`, for each
`model.remat_policy`: one JSON line per (config, scan_layers, remat_policy).

Ahead of time only: `jit_train_step(exp).lower(abstract state, abstract batch).compile()` on ShapeDtypeStructs,
so nothing is initialised or run and cluster configs (ViT-L, So400m, ViT-g) measure on a CPU machine. By default
on 8 virtual CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=8 is set unless XLA_FLAGS is); the
mesh is the config's, over all devices. Reports compile seconds (lower and compile separately) and
`memory_analysis()` per device: temp, argument, output and alias bytes, and temp + non-aliased output.

  python benchmarks/compile.py --config=configs/clip.py:L/14 [--config=configs/siglip.py:So400m/14 ...]
      [--set KEY=VALUE ...] [--scan both|true|false] [--policies none,full,...] [--batch_size 16]

XLA:CPU memory figures show what the policy saves in the program XLA keeps; GPU/TPU figures differ in size but
rank policies alike. `offload_dots` needs a GPU/TPU backend.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

if "XLA_FLAGS" not in os.environ:  # before jax is imported
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def abstract_batch(exp: Any, batch_size: int) -> dict[str, Any]:
    """ShapeDtypeStructs of a training batch (the objective's fields and the pipeline's skip counts), sharded as
    `sharding.host_to_global` places them."""
    import jax
    import numpy as np

    from vlp.data.pipeline import SKIPPED_KEY

    example = exp.objective.example_batch(batch_size)
    example[SKIPPED_KEY] = np.zeros((batch_size,), np.int32)
    shardings = exp.batch_shardings()
    return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=shardings[k]) for k, v in example.items()}


def measure(spec: str, overrides: dict[str, str], scan: bool, policy: str, batch_size: int) -> dict[str, Any]:
    from vlp import config as vlp_config
    from vlp.train.trainer import build_experiment, jit_train_step

    config = vlp_config.load_config_file(spec)
    vlp_config.apply_overrides(config, {**overrides, "batch_size": str(batch_size), "mesh.num_devices": "-1",
                                        "model.scan_layers": str(scan), "model.remat_policy": policy})
    exp = build_experiment(config)
    step = jit_train_step(exp)
    with exp.context():
        start = time.perf_counter()
        lowered = step.lower(exp.abstract_state, abstract_batch(exp, batch_size))
        lower_seconds = time.perf_counter() - start
        start = time.perf_counter()
        compiled = lowered.compile()
        compile_seconds = time.perf_counter() - start
    memory = compiled.memory_analysis()
    temp, out, alias = memory.temp_size_in_bytes, memory.output_size_in_bytes, memory.alias_size_in_bytes
    return {
        "config": spec, "scan_layers": scan, "remat_policy": policy, "batch_size": batch_size,
        "mesh": dict(exp.mesh.shape), "platform": exp.mesh.devices.flat[0].platform,
        "lower_seconds": round(lower_seconds, 2), "compile_seconds": round(compile_seconds, 2),
        "temp_bytes_per_device": int(temp), "argument_bytes_per_device": int(memory.argument_size_in_bytes),
        "output_bytes_per_device": int(out), "alias_bytes_per_device": int(alias),
        "temp_plus_output_bytes_per_device": int(temp + out - alias),
    }


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", action="append", default=[], help="config spec (repeatable)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--scan", default="both", choices=("both", "true", "false"))
    parser.add_argument("--policies", default="none,full,dots_saveable,dots_with_no_batch_dims_saveable")
    parser.add_argument("--batch_size", type=int, default=16)
    args = parser.parse_args(argv)

    from vlp import config as vlp_config
    from vlp.models.layers import REMAT_POLICIES

    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    bad = [p for p in policies if p not in REMAT_POLICIES]
    if bad:
        raise SystemExit(f"--policies: unknown {bad}; valid: {REMAT_POLICIES}")
    scans = {"both": (False, True), "true": (True,), "false": (False,)}[args.scan]
    overrides = vlp_config.parse_overrides(args.set)
    rows = []
    for spec in args.config or ["configs/clip.py:tiny"]:
        for scan in scans:
            for policy in policies:
                row = measure(spec, overrides, scan, policy, args.batch_size)
                print(json.dumps(row), flush=True)
                rows.append(row)
    return rows


if __name__ == "__main__":
    main()
