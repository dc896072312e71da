"""Metric outputs of a run (process 0 only): metrics.jsonl, TensorBoard (tensorboardX) and the progress line.

A workdir on an object store (`gs://...`) gets metrics.jsonl (rewritten whole at each log step: objects cannot be
appended to) and no TensorBoard files: tensorboardX writes to URLs only with extra packages and then only at close,
so a one-time warning says so; tools/plot_metrics.py draws the same scalars from metrics.jsonl.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from typing import Any, Mapping

import jax
import numpy as np
from etils import epath

from vlp.train.paths import is_local

log = logging.getLogger(__name__)

# Dense bf16 peak FLOP/s per device, the MFU denominator (vendor figures; CPU: XLA fp32 matmul measured on a
# 2-core CI-class machine, so CPU MFU figures are relative to that).
PEAK_FLOPS_PER_DEVICE = {
    "H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "TPU v4": 275e12, "TPU v5p": 459e12,
    "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v6 lite": 918e12, "TPU v6e": 918e12, "cpu": 450e9,
}


def peak_flops_per_device(device: jax.Device, override: float | None = None) -> float | None:
    if override:
        return float(override)
    kind = device.device_kind
    for name, peak in PEAK_FLOPS_PER_DEVICE.items():
        if name.lower() in kind.lower():
            return peak
    return PEAK_FLOPS_PER_DEVICE["cpu"] if device.platform == "cpu" else None


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
