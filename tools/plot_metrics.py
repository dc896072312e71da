#!/usr/bin/env python
"""Draw a run's curves (loss, learning rate, evals, throughput) from <workdir>/metrics.jsonl into a PNG.

  python tools/plot_metrics.py --workdir=runs/demo [--out=runs/demo/metrics.png] [--keys loss zeroshot_top1]
  python tools/plot_metrics.py --workdir runs/simmim runs/mae --keys loss --out=docs/mim_loss_curves.png  # overlay
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
    parser.add_argument("--workdir", required=True, nargs="+",
                        help="run directory with metrics.jsonl; several: one line per run, labelled by its name")
    parser.add_argument("--out", default=None, help="PNG path (default: <first workdir>/metrics.png)")
    parser.add_argument("--keys", nargs="*", default=None, help=f"metrics to plot (default: {DEFAULT_KEYS})")
    args = parser.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {}
    for workdir in args.workdir:
        path = Path(workdir) / "metrics.jsonl"
        if not path.is_file():
            raise SystemExit(f"no metrics at {path}: is --workdir a vlp run directory?")
        runs[Path(workdir).name] = load_series(path)
    available = set().union(*runs.values())
    keys = [k for k in (args.keys or DEFAULT_KEYS) if k in available]
    if not keys:
        raise SystemExit(f"none of the keys {args.keys or DEFAULT_KEYS} is in {args.workdir}; available: "
                         f"{sorted(available)}")
    cols = min(3, len(keys))
    rows = -(-len(keys) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.2 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        for name, series in runs.items():
            if key in series:
                steps, values = series[key]
                ax.plot(steps, values, marker="o" if len(steps) < 20 else None, markersize=3, label=name)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(runs) > 1:
            ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.suptitle(" vs ".join(runs))
    fig.tight_layout()
    out = Path(args.out) if args.out else Path(args.workdir[0]) / "metrics.png"
    fig.savefig(out, dpi=110)
    print(out)
    return out


if __name__ == "__main__":
    main()
