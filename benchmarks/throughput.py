#!/usr/bin/env python
"""Training throughput of one config on this machine's devices: samples/s, step time, model TFLOP/s per device,
MFU and compiled memory per device, on synthetic on-device batches (no input pipeline), as one JSON line.

  python benchmarks/throughput.py [--config=configs/clip.py:tiny] [--steps=30] [--set batch_size=256]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/clip.py:tiny", help="config file[:arg]")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--steps", type=int, default=30, help="timed steps (after 3 warm-up steps)")
    args = parser.parse_args(argv)

    import jax

    from vlp import config as vlp_config
    from vlp.parallel import sharding
    from vlp.train.metrics import peak_flops_per_device
    from vlp.train.trainer import build_experiment, jit_train_step

    config = vlp_config.load_config_file(args.config)
    vlp_config.apply_overrides(config, vlp_config.parse_overrides(args.set))
    exp = build_experiment(config)
    state = exp.init_state()
    step = jit_train_step(exp)
    rng = np.random.default_rng(0)
    host_batch = exp.objective.example_batch(config.batch_size)
    host_batch["image"] = rng.uniform(-1, 1, host_batch["image"].shape).astype(np.float32)
    host_batch["text"] = rng.integers(1, exp.objective.tokenizer.vocab_size - 1, host_batch["text"].shape,
                                      dtype=np.int32)
    with exp.context():
        batch = sharding.host_to_global(host_batch, exp.mesh)
        compiled = step.lower(state, batch).compile()
        memory = compiled.memory_analysis()
        for _ in range(3):
            state, metrics = step(state, batch)
        jax.block_until_ready(state)
        start = time.perf_counter()
        for _ in range(args.steps):
            state, metrics = step(state, batch)
        jax.block_until_ready((state, metrics))
        seconds = (time.perf_counter() - start) / args.steps
    samples_per_second = config.batch_size / seconds
    flops = exp.objective.train_flops_per_example() * samples_per_second / jax.device_count()
    peak = peak_flops_per_device(jax.devices()[0], config.hardware.peak_flops_per_device)
    result = {
        "config": args.config, "overrides": args.set, "device_kind": jax.devices()[0].device_kind,
        "devices": jax.device_count(), "batch_size": config.batch_size, "step_seconds": round(seconds, 5),
        "samples_per_second": round(samples_per_second, 1),
        "samples_per_second_per_device": round(samples_per_second / jax.device_count(), 1),
        "model_tflops_per_second_per_device": round(flops / 1e12, 4),
        "mfu": round(flops / peak, 4) if peak else None, "peak_flops_per_device": peak,
        "temp_bytes_per_device": getattr(memory, "temp_size_in_bytes", None),
        "argument_bytes_per_device": getattr(memory, "argument_size_in_bytes", None),
        "loss": float(metrics["loss"]),
    }
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
