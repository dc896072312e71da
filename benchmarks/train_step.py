#!/usr/bin/env python
"""Speed of the trainer's own jitted train step on this machine's devices, as one JSON line.

Builds the experiment with `vlp.train.trainer.build_experiment`, compiles `jit_train_step(exp)` ahead of time on a
synthetic batch that is generated on the devices (no input pipeline), runs warm-up steps, then times each step
with `jax.block_until_ready`; then times the objective's forward pass alone (its loss, jitted on the same params and
batch) for `--forward_steps`. Reports step time (mean and median), samples/s, the model FLOPs of the objective
(MaxText's analytic matmul count) next to the compiled step's `cost_analysis()` FLOPs, model TFLOP/s and MFU per
device for the whole step, the forward pass and the rest (backward + optimizer update, 2/3 of the FLOPs), and the
compiled memory per device (`memory_analysis()`). Uses the real devices (all of them unless
`--set mesh.num_devices=N`).

On CPU the process runs under vlp's glibc malloc settings (`vlp/host_malloc.py`: freed buffers are reused, so a step
pays no page faults; `minor_page_faults_per_step` shows it, `VLP_HOST_MALLOC=default` turns them off to compare).
`cores_busy` is process CPU time over wall time of the timed steps.

MFU's peak: `--peak_tflops`, else `hardware.peak_flops_per_device`, else on GPU/TPU the table in
vlp/train/metrics.py; on CPU this machine's own XLA fp32 matmul rate (`--peak_matmul_size`^3, best of 5), measured in
the same run before and after the timed steps (the larger of the two: other load only slows it down).

`--matmul_floor` times every matmul of the compiled step alone (each distinct dot of the optimized HLO, top level
and inside fusions, with its shapes, dtype and dimension numbers, jitted on its own; fastest of `--floor_repeats`)
and sums them by how often the step runs each: the step's time if it did nothing but its matmuls, at the rates this
backend reaches on those shapes (convolutions, such as a ViT's patch embedding, are counted but not timed).
`step_seconds_median - matmul_floor_seconds` is what everything else costs (attention's softmax, norms,
activations, the optimizer, data movement). The floor is per device (one device's program, timed on one device):
on virtual CPU devices, which share the host's cores, compare it with a one-device run. Steps whose HLO has loops
(`model.scan_layers`) are refused: a loop body's dots run once per trip.

  python benchmarks/train_step.py [--config=configs/clip.py:bench] [--set KEY=VALUE ...] [--steps 20]
      [--warmup 3] [--forward_steps 5] [--peak_tflops X] [--peak_matmul_size 2048]
      [--profile_steps A:B --profile_dir DIR] [--matmul_floor [--floor_repeats 5]]

On GPU/TPU add `--set precision.compute_dtype=bfloat16` (or `auto`); the bench variant is fp32 for CPUs.
`--profile_steps 2:4` traces timed steps 2 and 3 (0-based, end exclusive) with `jax.profiler` into
`--profile_dir` (open it with TensorBoard's profile plugin or xprof); traced steps are left out of the timings.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from xla_cpu_threads import minor_page_faults, time_op  # a sibling script: benchmarks/ is on sys.path as a program


def _say(message: str) -> None:
    print(f"[train_step] {message}", file=sys.stderr, flush=True)


def parse_profile_steps(spec: str | None, steps: int) -> range:
    """`"2:4"` -> range(2, 4), checked against the number of timed steps; None -> an empty range."""
    if not spec:
        return range(0)
    try:
        start, end = (int(x) for x in spec.split(":"))
    except ValueError as e:
        raise SystemExit(f"--profile_steps={spec!r} is not A:B (e.g. 2:4: timed steps 2 and 3)") from e
    if not 0 <= start < end <= steps:
        raise SystemExit(f"--profile_steps={spec!r} must satisfy 0 <= A < B <= --steps={steps}")
    if end - start >= steps:
        raise SystemExit(f"--profile_steps={spec!r} traces every timed step; use --steps > {end - start}")
    return range(start, end)


def first_cost(analysis: Any) -> dict[str, float]:
    """`compiled.cost_analysis()` is a dict in recent jax, a one-element list (per program) in older versions."""
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else None
    return dict(analysis or {})


_HLO_DTYPES = {"f32": "float32", "bf16": "bfloat16", "f16": "float16", "f64": "float64", "s8": "int8",
               "s32": "int32", "f8e4m3fn": "float8_e4m3fn", "f8e5m2": "float8_e5m2"}
_DOT = re.compile(r"%([\w.\-]+) = (\w+)\[([\d,]*)\]\S* dot\(%([\w.\-]+), %([\w.\-]+)\)(.*)")
_DEFINITION = re.compile(r"%([\w.\-]+) = (\w+)\[([\d,]*)\]")
_DOT_DIMS = re.compile(r"(lhs_batch_dims|lhs_contracting_dims|rhs_batch_dims|rhs_contracting_dims)=\{([\d,]*)\}")


def hlo_dots(hlo_text: str) -> collections.Counter:
    """Every dot of an optimized HLO module's text (top level and inside fusions) -> how many the module runs:
    a Counter keyed by (operand dtype, lhs shape, rhs shape, dot_general dimension numbers)."""
    if re.search(r"\swhile\(", hlo_text):
        raise ValueError("the compiled step has loops (model.scan_layers?): a loop body's matmuls run once per "
                         "trip, which the HLO text does not count; measure the floor without scan_layers")
    shapes = {m.group(1): (m.group(2), tuple(int(d) for d in m.group(3).split(",") if d))
              for m in _DEFINITION.finditer(hlo_text)}
    dots: collections.Counter = collections.Counter()
    for m in _DOT.finditer(hlo_text):
        dims = dict(_DOT_DIMS.findall(m.group(6).split("metadata=")[0]))
        axes = [tuple(int(d) for d in dims.get(key, "").split(",") if d) for key in
                ("lhs_contracting_dims", "rhs_contracting_dims", "lhs_batch_dims", "rhs_batch_dims")]
        (dtype, lhs), (_, rhs) = shapes[m.group(4)], shapes[m.group(5)]
        dots[(dtype, lhs, rhs, ((axes[0], axes[1]), (axes[2], axes[3])))] += 1
    return dots


def matmul_floor(dots: collections.Counter, repeats: int) -> dict[str, Any]:
    """Times each distinct dot of `hlo_dots` alone (jitted, operands on the default device, the fastest of `repeats`
    runs after a warm-up, as the peak is the best of 5) -> the summed seconds, FLOPs and the five dots that take
    longest in all."""
    import jax
    import numpy as np

    rows, total_seconds, total_flops = [], 0.0, 0.0
    for (dtype, lhs, rhs, dims), count in dots.items():
        if dtype not in _HLO_DTYPES:
            raise ValueError(f"a dot of HLO type {dtype!r}; the floor knows {sorted(_HLO_DTYPES)}")
        ((_, rhs_contracting), (_, rhs_batch)) = dims
        rhs_free = [size for axis, size in enumerate(rhs) if axis not in rhs_contracting + rhs_batch]
        flops = 2.0 * float(np.prod(lhs, dtype=float)) * float(np.prod(rhs_free, dtype=float))
        a, b = (jax.numpy.ones(shape, _HLO_DTYPES[dtype]) for shape in (lhs, rhs))
        seconds, _ = time_op(jax.jit(lambda a, b, dims=dims: jax.lax.dot_general(a, b, dims)), (a, b), repeats,
                             reduce=min)
        total_seconds, total_flops = total_seconds + count * seconds, total_flops + count * flops
        rows.append({"lhs": list(lhs), "rhs": list(rhs), "dimension_numbers": [list(map(list, d)) for d in dims],
                     "count": count, "ms_each": round(seconds * 1e3, 3),
                     "gflops_per_second": round(flops / seconds / 1e9, 1)})
    rows.sort(key=lambda r: -r["count"] * r["ms_each"])
    return {"matmul_floor_seconds": round(total_seconds, 5), "matmul_floor_flops": total_flops,
            "matmul_floor_distinct_dots": len(rows), "matmul_floor_dots": sum(dots.values()),
            "matmul_floor_slowest": rows[:5]}


def synthetic_batch_fn(exp: Any, batch_size: int):
    """A function rng -> a training batch with exactly the fields of the trainer's `exp.batch_shardings()`: the
    objective's fields shaped like `objective.example_batch` (images uniform in [-1, 1], text ids drawn from every row
    of the token-embedding table, other integer fields 0) and the input pipeline's per-example bookkeeping (e.g.
    skipped-record counts) as int32 zeros. Deriving the fields from the trainer keeps the benchmark's batch in step
    with what the jitted train step expects (a missing field is a pytree mismatch at compile time)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    objective = exp.objective
    example = objective.example_batch(batch_size)
    specs = {key: (example[key].shape, example[key].dtype) if key in example else ((batch_size,), np.dtype(np.int32))
             for key in exp.batch_shardings()}
    # ids below the configured vocabulary are valid for every objective (fusion models add mask/CLS rows above it)
    text_tower = getattr(getattr(objective, "model", None), "text", None)
    if isinstance(text_tower, dict) and "vocab_size" in text_tower:
        vocab_rows = text_tower["vocab_size"]
    else:
        vocab_rows = exp.config.model.text.vocab_size or objective.tokenizer.vocab_size

    def make(rng: jax.Array) -> dict[str, jax.Array]:
        out = {}
        for i, (key, (shape, dtype)) in enumerate(sorted(specs.items())):
            k = jax.random.fold_in(rng, i)
            if key == "text":
                out[key] = jax.random.randint(k, shape, 1, vocab_rows, jnp.int32)
            elif jnp.issubdtype(dtype, jnp.floating):
                out[key] = jax.random.uniform(k, shape, dtype, -1.0, 1.0)
            else:
                out[key] = jnp.zeros(shape, dtype)
        return out

    return make


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/clip.py:bench", help="config file[:variant,key=value,...]")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps after compiling")
    parser.add_argument("--forward_steps", type=int, default=5, help="timed forward-only runs (0: none)")
    parser.add_argument("--peak_tflops", type=float, default=None,
                        help="peak TFLOP/s per device for MFU (default: config hardware.peak_flops_per_device, "
                             "else the table in vlp/train/metrics.py by device kind; on CPU measured)")
    parser.add_argument("--peak_matmul_size", type=int, default=2048,
                        help="on CPU: the square fp32 matmul whose XLA rate is the MFU peak")
    parser.add_argument("--profile_steps", default=None, metavar="A:B", help="trace timed steps A..B-1")
    parser.add_argument("--profile_dir", default=None, help="where --profile_steps writes the trace")
    parser.add_argument("--matmul_floor", action="store_true",
                        help="also time each of the step's matmuls alone and report their sum")
    parser.add_argument("--floor_repeats", type=int, default=5, help="timed runs of each matmul for the floor")
    args = parser.parse_args(argv)
    if min(args.steps, args.peak_matmul_size, args.floor_repeats) < 1 or args.warmup < 0 or args.forward_steps < 0:
        raise SystemExit(f"--steps={args.steps}, --peak_matmul_size={args.peak_matmul_size} and "
                         f"--floor_repeats={args.floor_repeats} must be >= 1, "
                         f"--warmup={args.warmup} and --forward_steps={args.forward_steps} >= 0")
    profiled = parse_profile_steps(args.profile_steps, args.steps)
    if profiled and not args.profile_dir:
        raise SystemExit("--profile_steps needs --profile_dir (where the trace goes)")

    import jax
    import jax.numpy as jnp

    from vlp import config as vlp_config
    from vlp.objectives.base import resolve_compute_dtype
    from vlp.data.transforms import SKIPPED_KEY
    from vlp.train.metrics import measure_matmul_flops, peak_flops_per_device
    from vlp.train.trainer import build_experiment, jit_train_step

    config = vlp_config.load_config_file(args.config)
    vlp_config.apply_overrides(config, vlp_config.parse_overrides(args.set))
    exp = build_experiment(config)
    devices = exp.mesh.size
    _say(f"{args.config} {' '.join(args.set)}: batch {config.batch_size} on {devices} x "
         f"{jax.devices()[0].device_kind}, mesh {dict(exp.mesh.shape)}")

    override = args.peak_tflops * 1e12 if args.peak_tflops else config.hardware.peak_flops_per_device
    measure_peak = jax.devices()[0].platform == "cpu" and not override
    measured_peaks = []
    if measure_peak:  # before anything else is compiled and running
        measured_peaks.append(measure_matmul_flops(jax.local_devices()[0], args.peak_matmul_size))
        _say(f"XLA fp32 matmul {args.peak_matmul_size}^3: {measured_peaks[-1] / 1e9:.1f} GFLOP/s")
    state = exp.init_state()
    with exp.context():
        batch = jax.jit(synthetic_batch_fn(exp, config.batch_size),
                        out_shardings=exp.batch_shardings())(jax.random.key(config.seed))
        start = time.perf_counter()
        compiled = jit_train_step(exp).lower(state, batch).compile()
        compile_seconds = time.perf_counter() - start
        _say(f"compiled in {compile_seconds:.1f}s")
        for i in range(args.warmup):
            state, metrics = compiled(state, batch)
            jax.block_until_ready((state, metrics))
            _say(f"warm-up {i + 1}/{args.warmup}")
        step_seconds, step_faults, step_cpu_seconds = [], [], []
        for i in range(args.steps):
            if profiled and i == profiled.start:
                jax.profiler.start_trace(args.profile_dir)
            faults, cpu, start = minor_page_faults(), time.process_time(), time.perf_counter()
            state, metrics = compiled(state, batch)
            jax.block_until_ready((state, metrics))
            seconds, cpu_seconds, faults = (time.perf_counter() - start, time.process_time() - cpu,
                                            minor_page_faults() - faults)
            if profiled and i == profiled.stop - 1:
                jax.profiler.stop_trace()
            if i not in profiled:
                step_seconds.append(seconds)
                step_cpu_seconds.append(cpu_seconds)
                step_faults.append(faults)
            if i % max(1, args.steps // 5) == 0 or i == args.steps - 1:
                _say(f"step {i + 1}/{args.steps}: {seconds:.4f}s{' (traced)' if i in profiled else ''}")
        forward_seconds = []
        if args.forward_steps:
            # The objective's loss alone (what the step differentiates), on the same params and batch.
            model_batch = {k: v for k, v in batch.items() if k != SKIPPED_KEY}
            rng = jax.random.key(config.seed)
            objective = exp.objective
            if objective.has_extra:  # EMA teachers, momentum models, queues: the loss reads the extra state
                def loss(p, b):
                    return objective.loss_fn_with_extra(p, state.extra, b, rng, state.step)[0]
            else:
                def loss(p, b):
                    return objective.loss_fn(p, b, rng)[0]
            forward = jax.jit(loss).lower(state.params, model_batch).compile()
            jax.block_until_ready(forward(state.params, model_batch))
            for _ in range(args.forward_steps):
                start = time.perf_counter()
                jax.block_until_ready(forward(state.params, model_batch))
                forward_seconds.append(time.perf_counter() - start)
            _say(f"forward: {statistics.median(forward_seconds):.4f}s (median of {args.forward_steps})")
    floor = {}
    if args.matmul_floor:
        hlo_text = compiled.as_text()
        dots = hlo_dots(hlo_text)
        _say(f"matmul floor: timing {len(dots)} distinct dots ({sum(dots.values())} in the step) alone")
        floor = matmul_floor(dots, args.floor_repeats)
        # Convolutions (a ViT's patch embedding: 0.4% of clip.py:bench's FLOPs) are counted, not timed.
        floor["matmul_floor_untimed_convolutions"] = len(re.findall(r"\sconvolution\(", hlo_text))
        _say(f"matmul floor: {floor['matmul_floor_seconds']:.4f}s")
    if measure_peak:
        measured_peaks.append(measure_matmul_flops(jax.local_devices()[0], args.peak_matmul_size))
        _say(f"XLA fp32 matmul {args.peak_matmul_size}^3 after the steps: {measured_peaks[-1] / 1e9:.1f} GFLOP/s")

    mean_seconds = statistics.fmean(step_seconds)
    model_flops_per_step = exp.objective.train_flops_per_example() * config.batch_size
    model_flops_per_device = model_flops_per_step / devices
    compiled_flops = first_cost(compiled.cost_analysis()).get("flops")
    # The measured rate is the host's; virtual CPU devices (--xla_force_host_platform_device_count) share it.
    peak = max(measured_peaks) / jax.local_device_count() if measured_peaks else peak_flops_per_device(
        jax.devices()[0], override)
    model_flops_per_second = model_flops_per_device / mean_seconds
    memory = compiled.memory_analysis()
    result = {
        "config": args.config, "overrides": args.set, "device_kind": jax.devices()[0].device_kind,
        "devices": devices, "mesh": dict(exp.mesh.shape),
        "compute_dtype": jnp.dtype(resolve_compute_dtype(config.precision.compute_dtype)).name,
        "batch_size": config.batch_size, "warmup_steps": args.warmup, "steps": len(step_seconds),
        "timing": "each step timed alone: dispatch to jax.block_until_ready(state, metrics)",
        "compile_seconds": round(compile_seconds, 2),
        "step_seconds_mean": round(mean_seconds, 5),
        "step_seconds_median": round(statistics.median(step_seconds), 5),
        "steps_per_second": round(1.0 / mean_seconds, 3),
        "samples_per_second": round(config.batch_size / mean_seconds, 1),
        "model_flops_per_step": model_flops_per_step,
        "model_flops_per_step_per_device": model_flops_per_device,
        "compiled_flops_per_step_per_device": compiled_flops,
        "analytic_vs_compiled": round(model_flops_per_device / compiled_flops, 4) if compiled_flops else None,
        "model_tflops_per_second_per_device": round(model_flops_per_second / 1e12, 4),
        "peak_tflops_per_device": float(f"{peak / 1e12:.6g}") if peak else None,
        "peak_source": ("measured: XLA fp32 matmul " + str(args.peak_matmul_size) + "^3, best of 5, before and after"
                        if measured_peaks else "--peak_tflops / hardware.peak_flops_per_device" if override
                        else "vlp/train/metrics.py table"),
        "measured_peak_tflops": [round(p / 1e12, 5) for p in measured_peaks],
        "devices_sharing_measured_peak": jax.local_device_count() if measured_peaks else None,
        "mfu": round(model_flops_per_second / peak, 4) if peak else None,
        "temp_bytes_per_device": getattr(memory, "temp_size_in_bytes", None),
        "argument_bytes_per_device": getattr(memory, "argument_size_in_bytes", None),
        "output_bytes_per_device": getattr(memory, "output_size_in_bytes", None),
        "alias_bytes_per_device": getattr(memory, "alias_size_in_bytes", None),
        "loss": float(metrics["loss"]),
        "minor_page_faults_per_step": int(statistics.median(step_faults)),
        # Process CPU seconds per wall second of the timed steps: how many cores the step kept busy (or spinning).
        "cores_busy": round(sum(step_cpu_seconds) / sum(step_seconds), 2),
    }
    if forward_seconds:
        # Forward = 1/3 of the model FLOPs (flops.py counts training as 3x forward); the rest of the step (backward
        # pass, optimizer update) does the other 2/3. Medians: the step's and the forward's.
        step_median, forward_median = statistics.median(step_seconds), statistics.median(forward_seconds)
        forward_flops, rest_seconds = model_flops_per_device / 3, step_median - forward_median
        result.update(
            forward_seconds_median=round(forward_median, 5),
            backward_and_update_seconds=round(rest_seconds, 5),
            forward_mfu=round(forward_flops / forward_median / peak, 4) if peak else None,
            backward_and_update_mfu=round(2 * forward_flops / rest_seconds / peak, 4) if peak and rest_seconds > 0
            else None,
            step_mfu_median=round(model_flops_per_device / step_median / peak, 4) if peak else None)
    if floor:
        step_median = statistics.median(step_seconds)
        floor.update(matmul_floor_share_of_step=round(floor["matmul_floor_seconds"] / step_median, 4),
                     seconds_beyond_matmul_floor=round(step_median - floor["matmul_floor_seconds"], 5),
                     matmul_floor_mfu=round(model_flops_per_device / floor["matmul_floor_seconds"] / peak, 4)
                     if peak else None)
        result.update(floor)
    if profiled:
        traces = sorted(str(p) for p in Path(args.profile_dir).rglob("*.xplane.pb"))
        result.update(profiled_steps=f"{profiled.start}:{profiled.stop}", profile_dir=args.profile_dir,
                      trace_files=traces[-1:])
        _say(f"trace of timed steps {profiled.start}..{profiled.stop - 1} written under {args.profile_dir}: "
             f"{traces[-1] if traces else 'no .xplane.pb found'}")
    if jax.process_index() == 0:
        print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    from vlp.host_malloc import reexec_with_malloc_tunables

    reexec_with_malloc_tunables()  # on CPU: freed buffers reused, no page faults per step (vlp/host_malloc.py)
    main()
