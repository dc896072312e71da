"""Metric outputs of a run (process 0 only): metrics.jsonl, TensorBoard (tensorboardX) and the progress line.

A workdir on an object store (`gs://...`) gets metrics.jsonl (rewritten whole at each log step: objects cannot be
appended to) and no TensorBoard files: tensorboardX writes to URLs only with extra packages and then only at close,
so a one-time warning says so; tools/plot_metrics.py draws the same scalars from metrics.jsonl.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import sys
import time
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from vlp.train.paths import is_local

log = logging.getLogger(__name__)

# Dense bf16 peak FLOP/s per device, the MFU denominator (vendor figures). CPUs differ too much for a table: there the
# peak is this machine's own XLA fp32 matmul rate, measured once per process (`measure_matmul_flops`).
PEAK_FLOPS_PER_DEVICE = {
    "H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "TPU v4": 275e12, "TPU v5p": 459e12,
    "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v6 lite": 918e12, "TPU v6e": 918e12,
}
CPU_PEAK_MATMUL_SIZE = 1024  # the trainer's measurement: ~2 GFLOP per product, well under a second on 2 cores


def measure_matmul_flops(device: jax.Device, size: int = CPU_PEAK_MATMUL_SIZE, repeats: int = 5,
                         dtype: Any = jnp.float32) -> float:
    """FLOP/s of XLA's own `size` x `size` @ `size` x `size` matmul on `device`: the best of `repeats` timed runs
    after a compile-and-run warm-up (the best, because other load only ever slows a run down). Counts 2 * size**3
    FLOPs per product, as `vlp/models/flops.py` counts the model's matmuls."""
    if size < 1 or repeats < 1:
        raise ValueError(f"measure_matmul_flops: size={size} and repeats={repeats} must be >= 1")
    a = jax.device_put(jnp.ones((size, size), dtype) / size, device)
    b = jax.device_put(jnp.ones((size, size), dtype), device)
    matmul = jax.jit(jnp.matmul).lower(a, b).compile()
    jax.block_until_ready(matmul(a, b))
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(matmul(a, b))
        best = min(best, time.perf_counter() - start)
    return 2.0 * size ** 3 / best


@functools.cache
def _measured_cpu_peak(device: jax.Device) -> float:
    return measure_matmul_flops(device)


def peak_flops_per_device(device: jax.Device, override: float | None = None) -> float | None:
    """The MFU denominator: `override` if set; an accelerator's figure from `PEAK_FLOPS_PER_DEVICE` by device kind
    (None for an unknown kind); on CPU this host's measured fp32 matmul rate (`measure_matmul_flops`, once per
    process) shared by its CPU devices (`--xla_force_host_platform_device_count=8` makes 8 devices of the same
    cores, so each gets 1/8)."""
    if override:
        return float(override)
    if device.platform == "cpu":
        local = jax.local_devices(backend="cpu")  # devices()[0] may belong to another process
        return _measured_cpu_peak(local[0]) / len(local)
    kind = device.device_kind
    for name, peak in PEAK_FLOPS_PER_DEVICE.items():
        if name.lower() in kind.lower():
            return peak
    return None


def to_python(metrics: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(np.asarray(v)) for k, v in metrics.items()}


def format_seconds(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def progress_line(step: int, total: int, metrics: Mapping[str, float]) -> str:
    """`step 300/3000 | loss 2.1432 | 1,050 samples/s | MFU 12.3% | data 4% | ETA 4m12s`."""
    parts = [f"step {step}/{total}", f"loss {metrics['loss']:.4f}"]
    if "samples_per_second" in metrics:
        parts.append(f"{metrics['samples_per_second']:,.0f} samples/s")
    if "mfu" in metrics:
        parts.append(f"MFU {100 * metrics['mfu']:.1f}%")
    if "data_wait_fraction" in metrics:
        parts.append(f"data {100 * metrics['data_wait_fraction']:.0f}%")
    if "eta_seconds" in metrics:
        parts.append(f"ETA {format_seconds(metrics['eta_seconds'])}")
    return " | ".join(parts)


class MetricWriter:
    """Appends `{"step": s, **metrics}` lines to metrics.jsonl and scalars to TensorBoard; no-op off process 0."""

    def __init__(self, workdir: epath.PathLike, enabled: bool | None = None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        workdir = epath.Path(workdir)
        self.path = workdir / "metrics.jsonl"
        self._tb = None
        self._text: str | None = None  # an object store's metrics.jsonl, rewritten whole at each write
        if not self.enabled:
            return
        if is_local(workdir):
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(workdir / "tensorboard"))
            # A run killed mid-write leaves a partial last line: end it, so new records start on their own line.
            if self.path.exists() and self.path.stat().length:
                with self.path.open("rb") as f:
                    f.seek(-1, 2)
                    torn = f.read(1) != b"\n"
                if torn:
                    with self.path.open("a") as f:
                        f.write("\n")
        else:
            log.warning("workdir %s is not local: no TensorBoard files are written (metrics.jsonl has the same "
                        "scalars; python tools/plot_metrics.py --workdir=%s draws them)", workdir, workdir)
            self._text = self.path.read_text() if self.path.exists() else ""
            if self._text and not self._text.endswith("\n"):
                self._text += "\n"

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        line = json.dumps({"step": int(step), **{k: float(v) for k, v in metrics.items()}}) + "\n"
        if self._text is not None:
            self._text += line
            self.path.write_text(self._text)
        else:
            with self.path.open("a") as f:
                f.write(line)
        if self._tb is not None:
            for key, value in metrics.items():
                self._tb.add_scalar(key, float(value), int(step))
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_jsonl(path: epath.PathLike) -> list[dict]:
    """The records of a metrics.jsonl; a line torn by a killed run is skipped."""
    path = epath.Path(path)
    records = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # only a partial line written when the process was killed
    return records


def say(message: str) -> None:
    """A log line from process 0 with a timestamp, flushed at once (progress must show in pipes and CI)."""
    if jax.process_index() == 0:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stdout, flush=True)
