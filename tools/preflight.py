#!/usr/bin/env python
"""Check a run before it spends cluster time: devices vs mesh, memory per device, data, tokenizer, workdir.

  # on the cluster, the same command on every host (it joins the other processes like the trainer does):
  python tools/preflight.py --config=configs/clip.py:B/16 --workdir=/shared/runs/b16
  # anywhere, simulating the target's devices (no accelerator needed):
  python tools/preflight.py --config=configs/clip.py:L/14 --devices=8 --device-kind="TPU v5 lite"

Prints a table (check, value, ok/WARN/FAIL/skip, reason) and exits 1 if any check fails.

Memory per device = params + optimizer state + gradients (from the trainer's own sharded abstract state: each leaf's
bytes / its number of shards) + activations. Activations come from XLA when the devices are real (the trainer's
jitted step compiled ahead of time on abstract inputs: `compiled.memory_analysis()`, temp + outputs not aliased to
inputs), and from an analytic estimate when they are simulated (`--devices`; `--activations` picks either): per
token and layer a pre-LN block keeps ~16 x width + 4 x mlp_dim + 3 x heads x tokens values for the backward pass in
the compute dtype (matched to XLA's compiled figure for configs/clip.py:bench and :tiny, fp32 on CPU, within 2%);
with remat only the block input, plus one block being recomputed (not calibrated: XLA:CPU saves no memory with
remat); the `gather` contrastive loss holds ~8 (softmax) / ~4.5 (sigmoid) fp32 copies of its b x B logits (measured
with benchmarks/loss_memory.py), the `ring` loss at most ~128 MiB. Treat the analytic figure as +-50%.
Device memory comes from the device (`memory_stats()["bytes_limit"]`), else --device-memory-gib, else the device
kind's HBM (GPUs: times XLA_PYTHON_CLIENT_MEM_FRACTION, default 0.75), and on CPU the host's RAM shared by its
devices.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))

GIB = 2**30
WARN_FRACTION = 0.9  # of device memory: above this, fragmentation and XLA's own buffers may not fit
# HBM per device by JAX device kind (first substring match); GPU kinds usually carry it in the name ("80GB").
DEVICE_MEMORY_GIB = (("TPU v5 lite", 16), ("TPU v5e", 16), ("TPU v6 lite", 32), ("TPU v6e", 32), ("TPU v5p", 95),
                     ("TPU v5", 95), ("TPU v4", 32), ("TPU v3", 16), ("H200", 141))
# Fp32 copies of the b x B logits the `gather` loss holds in forward + backward (loss_memory.py: 7.6-8.1 softmax,
# 4.3-4.6 sigmoid); the ring loss works on blocks of at most 4M logits (16 MiB) with about as many copies.
GATHER_LOGIT_COPIES = {"softmax": 8.0, "sigmoid": 4.5}
RING_BLOCK_ELEMENTS = 2**22


@dataclasses.dataclass
class Row:
    check: str
    value: str
    status: str = "ok"  # ok | WARN | FAIL | skip
    reason: str = ""


def gib(num_bytes: float) -> str:
    """Bytes in GiB, or MiB below 1 GiB (small test configs)."""
    return f"{num_bytes / GIB:.2f} GiB" if num_bytes >= GIB else f"{num_bytes / 2**20:.1f} MiB"


def platform_of(kind: str) -> str:
    """'TPU v5 lite' -> tpu, 'NVIDIA H100 80GB HBM3' -> gpu, anything else -> cpu."""
    lowered = kind.lower()
    if "tpu" in lowered:
        return "tpu"
    return "gpu" if any(k in lowered for k in ("nvidia", "gpu", "h100", "h200", "a100", "b200", "amd")) else "cpu"


def kind_memory_bytes(kind: str, local_devices: int) -> tuple[float | None, str]:
    """Usable memory per device from the device kind alone, and where the figure comes from."""
    if platform_of(kind) == "cpu":
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return ram / max(local_devices, 1), f"host RAM / {local_devices} CPU devices"
    match = re.search(r"(\d+)\s*GB", kind)
    hbm = int(match.group(1)) if match else next((g for name, g in DEVICE_MEMORY_GIB if name in kind), None)
    if hbm is None:
        return None, f"unknown for device kind {kind!r}"
    if platform_of(kind) == "gpu":  # XLA's allocator takes this fraction of each GPU
        fraction = float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.75"))
        return hbm * GIB * fraction, f"{hbm} GiB HBM of {kind} x XLA_PYTHON_CLIENT_MEM_FRACTION {fraction}"
    return hbm * GIB, f"{hbm} GiB HBM of {kind}"


def shard_bytes(tree: Any) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs (leaf bytes / its shards)."""
    import jax
    import numpy as np

    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if getattr(leaf, "sharding", None) is not None else leaf.shape
        total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
    return total


def tower_activation_bytes(batch: int, tokens: int, width: int, depth: int, mlp_dim: int, heads: int, remat: bool,
                           dtype_bytes: int, tensor: int) -> float:
    """Values a transformer tower keeps for its backward pass on one device (see the module docstring)."""
    per_token_layer = 16 * width + (4 * mlp_dim + 3 * heads * tokens) / tensor
    one_layer = batch * tokens * per_token_layer * dtype_bytes
    if remat:
        return depth * batch * tokens * width * dtype_bytes + one_layer
    return depth * one_layer


def analytic_activation_bytes(exp: Any, platform: str) -> tuple[float, str]:
    """Activations + loss + input batch per device for a two-tower objective, and a one-line breakdown."""
    config, objective = exp.config, exp.objective
    model = getattr(objective, "model", None)
    image, text = getattr(model, "image", None), getattr(model, "text", None)
    if not isinstance(image, dict) or not isinstance(text, dict):
        raise NotImplementedError(f"no analytic estimate for objective {config.objective!r}: use "
                                  f"--activations=compile")
    name = config.precision.compute_dtype
    dtype_bytes = 4 if name == "float32" or (name == "auto" and platform == "cpu") else 2
    shards = exp.mesh.shape["data"] * exp.mesh.shape["fsdp"]
    tensor = exp.mesh.shape["tensor"]
    local_batch = config.batch_size // shards
    micro_batch = local_batch // config.accumulation.steps
    image_tokens = (config.data.image_size // image["patch_size"]) ** 2 + image["num_cls_tokens"]
    image_bytes = tower_activation_bytes(micro_batch, image_tokens, image["width"], image["depth"], image["mlp_dim"],
                                         image["num_heads"], image["remat_policy"] != "none", dtype_bytes, tensor)
    text_bytes = tower_activation_bytes(micro_batch, text["max_len"], text["width"], text["depth"], text["mlp_dim"],
                                        text["num_heads"], text["remat_policy"] != "none", dtype_bytes, tensor)
    kind = getattr(objective, "loss_kind", "softmax")
    if config.loss.variant == "ring":
        loss_bytes = GATHER_LOGIT_COPIES[kind] * min(local_batch**2, RING_BLOCK_ELEMENTS) * 4
    else:
        loss_bytes = GATHER_LOGIT_COPIES[kind] * local_batch * config.batch_size * 4
    input_bytes = local_batch * (config.data.image_size**2 * 3 + config.data.max_text_len + 1) * 4
    total = image_bytes + text_bytes + loss_bytes + input_bytes
    detail = (f"analytic: image tower {gib(image_bytes)}, text tower {gib(text_bytes)}, {config.loss.variant} "
              f"{kind} loss {gib(loss_bytes)}, input {gib(input_bytes)}; {dtype_bytes}-byte compute, "
              f"{micro_batch} examples per device")
    return total, detail


def compiled_memory_bytes(exp: Any) -> tuple[float, float, str]:
    """(state + batch arguments, temp + non-aliased outputs) per device from XLA, for the trainer's own step."""
    import jax

    from vlp.train import trainer

    example = exp.objective.example_batch(1)
    shardings = exp.batch_shardings()
    batch = {k: jax.ShapeDtypeStruct((exp.config.batch_size, *v.shape[1:]), v.dtype, sharding=shardings[k])
             for k, v in example.items()}
    with exp.context():
        compiled = trainer.jit_train_step(exp).lower(exp.abstract_state, batch).compile()
    stats = compiled.memory_analysis()
    extra = stats.temp_size_in_bytes + stats.output_size_in_bytes - stats.alias_size_in_bytes
    detail = (f"compiled: temp {gib(stats.temp_size_in_bytes)}, outputs {gib(stats.output_size_in_bytes)} "
              f"({gib(stats.alias_size_in_bytes)} reuse donated inputs), arguments "
              f"{gib(stats.argument_size_in_bytes)}")
    return stats.argument_size_in_bytes, extra, detail


def check_workdir(workdir: str) -> Row:
    """Writable (a temp file is created and removed), not under a regular file; a URL is not a local path."""
    if re.match(r"^[a-z][a-z0-9+]*://", workdir):
        scheme = workdir.split(":", 1)[0]
        return Row("workdir", workdir, "FAIL", f"vlp writes the workdir through the local filesystem, so a {scheme}:// "
                   f"URL would become a local directory named '{scheme}:'; mount the bucket (e.g. gcsfuse) on every "
                   f"host and pass the mount path")
    path = Path(workdir).expanduser().absolute()
    for parent in [path, *path.parents]:
        if parent.exists() and not parent.is_dir():
            return Row("workdir", workdir, "FAIL", f"{parent} is a regular file, not a directory; choose another "
                       f"--workdir")
    existing = next(p for p in [path, *path.parents] if p.exists())
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".vlp-preflight-"):
            pass
    except OSError as e:
        return Row("workdir", workdir, "FAIL", f"cannot write in {existing}: {e.strerror}; choose another --workdir")
    return Row("workdir", workdir, "ok", "exists, writable" if existing == path else f"will be created in {existing}")


def check_workdir_shared(workdir: str, process_id: int, num_processes: int) -> Row:
    """Every process writes a marker; after a barrier each must see all markers (checkpoints need shared storage)."""
    from jax.experimental import multihost_utils

    path = Path(workdir).expanduser()
    marker = path / f".vlp-preflight-{process_id}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        marker.write_text("")
    except OSError as e:  # reported by check_workdir; still join the barriers, or the other processes would hang
        error = e.strerror
    else:
        error = None
    multihost_utils.sync_global_devices("preflight: workdir markers written")
    missing = [i for i in range(num_processes) if not (path / f".vlp-preflight-{i}").exists()]
    multihost_utils.sync_global_devices("preflight: workdir markers read")
    if error is not None:
        return Row("workdir shared", workdir, "FAIL", f"cannot write here: {error}")
    marker.unlink()
    if missing:
        return Row("workdir shared", workdir, "FAIL", f"this host does not see the files of processes {missing}: every "
                   f"process writes its own checkpoint shards, so the workdir must be on storage all hosts mount")
    return Row("workdir shared", workdir, "ok", f"all {num_processes} processes see each other's files")


def check_data(config: Any) -> list[Row]:
    """The tokenizer loads; the training source opens and its first record reads; path-like data keys exist."""
    from vlp import config as vlp_config
    from vlp.data import sources
    from vlp.data.tokenizer import load_tokenizer

    rows = []
    try:
        tokenizer = load_tokenizer(config.data.tokenizer or None)
        rows.append(Row("tokenizer", config.data.tokenizer or "bundled shapes tokenizer", "ok",
                        f"vocab {tokenizer.vocab_size}"))
    except Exception as e:  # noqa: BLE001 - any failure to load is the finding
        rows.append(Row("tokenizer", config.data.tokenizer or "bundled", "FAIL", str(e)))
    for key, value in config.data.items():
        if isinstance(value, str) and value and key != "tokenizer" and key.endswith(("path", "dir", "pattern",
                                                                                       "files")):
            found = sorted(Path().glob(value)) if any(c in value for c in "*?[") else [Path(value)]
            ok = bool(found) and all(p.exists() for p in found)
            rows.append(Row(f"data.{key}", value, "ok" if ok else "FAIL", "" if ok else "not found"))
    split = config.data.train_split
    for spec, _ in vlp_config.parse_mixture(config.data.mixture) or [(config.data.source, 1.0)]:
        try:
            source = sources.make_source(spec, split, config.data.image_size)
            record = source[0]
            rows.append(Row("data", f"{spec} {split} split", "ok",
                            f"{len(source):,} records; record 0 has {sorted(record)}"))
        except Exception as e:  # noqa: BLE001
            rows.append(Row("data", f"{spec} {split} split", "FAIL", f"cannot read record 0: {e}"))
    return rows


def memory_rows(exp: Any, method: str, platform: str, memory_bytes: float | None, memory_source: str) -> list[Row]:
    state = exp.abstract_state
    params, opt = shard_bytes(state.params), shard_bytes(state.opt_state)
    rows = [Row("params + optimizer", f"{gib(params)} + {gib(opt)} per device", "ok",
                f"+ {gib(params)} gradients; {exp.config.optim.name}, sharded as the trainer shards them")]
    if method == "compile":
        arguments, extra, detail = compiled_memory_bytes(exp)
        total = arguments + extra
        rows.append(Row("activations", f"{gib(extra)} per device", "ok", detail))
    else:
        activations, detail = analytic_activation_bytes(exp, platform)
        total = 2 * params + opt + activations  # params, gradients, optimizer state
        rows.append(Row("activations", f"{gib(activations)} per device", "ok", detail))
    if memory_bytes is None:
        rows.append(Row("memory", f"needs ~{gib(total)} per device", "skip",
                        f"device memory {memory_source}: pass --device-memory-gib"))
        return rows
    share = total / memory_bytes
    value = f"needs ~{gib(total)} of {gib(memory_bytes)} per device ({share:.0%})"
    if share > 1:
        rows.append(Row("memory", value, "FAIL", f"does not fit ({memory_source}): shard more (mesh fsdp), use "
                        f"model.remat_policy=full, loss.variant=ring, accumulation.steps > 1, or a smaller batch_size"))
    elif share > WARN_FRACTION:
        rows.append(Row("memory", value, "WARN", f"over {WARN_FRACTION:.0%} of {memory_source}: little headroom"))
    else:
        rows.append(Row("memory", value, "ok", memory_source))
    return rows


def run_checks(args: argparse.Namespace) -> list[Row]:
    import jax

    from vlp import config as vlp_config
    from vlp.parallel import mesh as mesh_lib
    from vlp.train import trainer

    rows: list[Row] = []
    info = None
    if args.devices is None:
        from vlp.parallel import distributed

        info = distributed.initialize()  # before any device use; a no-op for one process
        rows.append(Row("processes", f"process {info.process_id} of {info.num_processes}", "ok", info.source))
    try:
        config = vlp_config.load_config_file(args.config)
        vlp_config.apply_overrides(config, vlp_config.parse_overrides(args.set))
        vlp_config.validate(config)
    except Exception as e:  # noqa: BLE001
        return rows + [Row("config", args.config, "FAIL", str(e))]
    rows.append(Row("config", args.config, "ok", f"{config.objective}, batch {config.batch_size}, "
                    f"mesh.shape {tuple(config.mesh.shape)}"))
    rows += check_data(config)
    if args.workdir:
        rows.append(check_workdir(args.workdir))
        if info is not None and info.num_processes > 1 and "://" not in args.workdir:  # same choice on every host
            rows.append(check_workdir_shared(args.workdir, info.process_id, info.num_processes))

    devices = jax.devices()
    kind = args.device_kind or devices[0].device_kind
    if args.devices is not None:
        rows.append(Row("devices", f"{len(devices)} x {kind}", "ok", "simulated (--devices)"))
        platform = platform_of(kind)
    else:
        platform = jax.default_backend()
        status, reason = "ok", f"{jax.process_count()} process(es), {jax.local_device_count()} local"
        if args.device_kind and args.device_kind != devices[0].device_kind:
            status, reason = "FAIL", f"expected --device-kind {args.device_kind!r}, found {devices[0].device_kind!r}"
        rows.append(Row("devices", f"{len(devices)} x {devices[0].device_kind}", status, reason))
    try:  # the trainer's own checks: mesh vs devices, batch vs data x fsdp and processes
        exp = trainer.build_experiment(config)
    except ValueError as e:
        return rows + [Row("mesh/batch", f"mesh.shape {tuple(config.mesh.shape)}", "FAIL", str(e))]
    except Exception as e:  # noqa: BLE001
        return rows + [Row("experiment", config.objective, "FAIL", f"{type(e).__name__}: {e}")]
    shape = tuple(exp.mesh.shape.values())
    shards = mesh_lib.batch_shard_count(exp.mesh)
    rows.append(Row("mesh", f"(data, fsdp, tensor) = {shape}", "ok", f"{exp.mesh.size} devices"))
    rows.append(Row("batch", f"{config.batch_size} global, {config.batch_size // shards} per batch shard", "ok",
                    f"accumulation.steps {config.accumulation.steps}"))
    stats = jax.local_devices()[0].memory_stats() if args.devices is None else None
    if stats and stats.get("bytes_limit"):
        memory_bytes, memory_source = float(stats["bytes_limit"]), "the device's memory_stats() bytes_limit"
    elif args.device_memory_gib:
        memory_bytes, memory_source = args.device_memory_gib * GIB, f"--device-memory-gib={args.device_memory_gib}"
    else:
        local_devices = len(devices) if args.devices is not None else jax.local_device_count()
        memory_bytes, memory_source = kind_memory_bytes(kind, local_devices)
    method = args.activations
    if method == "auto":
        method = "analytic" if args.devices is not None else "compile"
    try:
        rows += memory_rows(exp, method, platform, memory_bytes, memory_source)
    except NotImplementedError as e:
        rows.append(Row("memory", "not estimated", "skip", str(e)))
    except Exception as e:  # noqa: BLE001 - e.g. XLA cannot compile the step: that is the finding
        traceback.print_exc()
        rows.append(Row("memory", "not estimated", "FAIL", f"{type(e).__name__}: {e}"))
    return rows


def format_table(rows: Sequence[Row]) -> str:
    widths = [max(len(getattr(r, f)) for r in [Row("check", "value", "status"), *rows]) for f in ("check", "value")]
    lines = [f"{'check':<{widths[0]}}  {'value':<{widths[1]}}  {'status':<6}  reason"]
    for r in rows:
        lines.append(f"{r.check:<{widths[0]}}  {r.value:<{widths[1]}}  {r.status:<6}  {r.reason}")
    return "\n".join(lines)


def simulate_devices(count: int) -> None:
    """`count` CPU devices stand in for the target's; must run before JAX starts its backend."""
    import jax

    flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    os.environ["XLA_FLAGS"] = " ".join(flags)
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", count)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="config file[:arg], e.g. configs/clip.py:B/16")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set batch_size=4096 (repeatable)")
    parser.add_argument("--workdir", default=None, help="the run directory to check (writable, shared by all hosts)")
    parser.add_argument("--devices", type=int, default=None,
                        help="simulate this many devices (CPU stand-ins) instead of using the real ones")
    parser.add_argument("--device-kind", default=None,
                        help="expected device kind, e.g. 'TPU v5 lite', 'NVIDIA H100 80GB HBM3' (with --devices: "
                             "the simulated kind, which sets the compute dtype and the memory per device)")
    parser.add_argument("--device-memory-gib", type=float, default=None, help="usable memory per device, GiB")
    parser.add_argument("--activations", choices=("auto", "compile", "analytic"), default="auto",
                        help="auto: compile on real devices, analytic when simulated")
    args = parser.parse_args(argv)
    if args.devices is not None:
        if args.devices < 1:
            parser.error(f"--devices={args.devices} must be >= 1")
        simulate_devices(args.devices)
    from _common import quiet_library_logs

    quiet_library_logs()
    rows = run_checks(args)
    print(format_table(rows), flush=True)
    failed = [r.check for r in rows if r.status == "FAIL"]
    print(f"preflight: {len(rows)} checks, {len(failed)} failed" + (f": {', '.join(failed)}" if failed else ""),
          flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
