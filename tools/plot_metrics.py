#!/usr/bin/env python
"""Draw a run's curves (loss, learning rate, evals, throughput) from <workdir>/metrics.jsonl into a PNG.

  python tools/plot_metrics.py --workdir=runs/demo [--out=runs/demo/metrics.png] [--keys loss zeroshot_top1]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

DEFAULT_KEYS = ("loss", "zeroshot_top1", "retrieval_i2t_r1", "retrieval_t2i_r1", "lr", "samples_per_second")


def load_series(path: Path) -> dict[str, tuple[list[int], list[float]]]:
    series: dict[str, tuple[list[int], list[float]]] = {}
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                steps, values = series.setdefault(key, ([], []))
                steps.append(record["step"])
                values.append(value)
    return series


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="run directory with metrics.jsonl")
    parser.add_argument("--out", default=None, help="PNG path (default: <workdir>/metrics.png)")
    parser.add_argument("--keys", nargs="*", default=None, help=f"metrics to plot (default: {DEFAULT_KEYS})")
    args = parser.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(args.workdir) / "metrics.jsonl"
    if not path.is_file():
        raise SystemExit(f"no metrics at {path}: is --workdir a vlp run directory?")
    series = load_series(path)
    keys = [k for k in (args.keys or DEFAULT_KEYS) if k in series]
    if not keys:
        raise SystemExit(f"none of the keys {args.keys or DEFAULT_KEYS} is in {path}; available: {sorted(series)}")
    cols = min(3, len(keys))
    rows = -(-len(keys) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.2 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        steps, values = series[key]
        ax.plot(steps, values, marker="o" if len(steps) < 20 else None, markersize=3)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.suptitle(str(Path(args.workdir).name))
    fig.tight_layout()
    out = Path(args.out) if args.out else Path(args.workdir) / "metrics.png"
    fig.savefig(out, dpi=110)
    print(out)
    return out


if __name__ == "__main__":
    main()
