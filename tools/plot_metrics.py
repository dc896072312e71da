#!/usr/bin/env python
"""Draw training curves (loss, learning rate, evals, throughput) and evaluation results into a PNG.

  python tools/plot_metrics.py --workdir=runs/demo [--out=runs/demo/metrics.png] [--keys loss zeroshot_top1]
  python tools/plot_metrics.py --workdir runs/clip runs/tips --keys loss dense_miou --out=compare.png
  python tools/plot_metrics.py --workdir runs/simmim runs/mae --keys loss --out=docs/mim_loss_curves.png
  python tools/plot_metrics.py --eval_json runs/clip/eval_test_step1600.json runs/tips/eval_test_step1600.json \
      --out=evals.png

Curves come from each workdir's metrics.jsonl (several workdirs are overlaid, one line each); --eval_json files
(written by tools/eval.py) are drawn as grouped bars, one group per metric, one bar per file.
"""

from __future__ import annotations

import argparse
import io
import json

from etils import epath

DEFAULT_KEYS = ("loss", "zeroshot_top1", "retrieval_i2t_r1", "retrieval_t2i_r1", "lr", "samples_per_second")
NOT_SCORES = ("step", "eval_seconds")  # and `*_l2`: the linear probe's chosen regularisation, not a score


def load_series(path: epath.Path) -> dict[str, tuple[list[int], list[float]]]:
    series: dict[str, tuple[list[int], list[float]]] = {}
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line torn by a crash mid-write: the rest of the file is still good
            continue
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                steps, values = series.setdefault(key, ([], []))
                steps.append(record["step"])
                values.append(value)
    return series


def load_eval_scores(paths: list[epath.Path]) -> dict[str, dict[str, float]]:
    """{file label: {metric: value}} for the numeric metrics of tools/eval.py JSON files."""
    out = {}
    for path in paths:
        if not path.is_file():
            raise SystemExit(f"no eval results at {path}: run tools/eval.py first")
        record = json.loads(path.read_text())
        label = f"{path.parent.name}/{path.stem}"
        out[label] = {k: v for k, v in record.items()
                      if isinstance(v, (int, float)) and k not in NOT_SCORES and not k.endswith("_l2")}
    return out


def _grid(plt, count: int):
    cols = min(3, count)
    rows = -(-count // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.2 * rows), squeeze=False)
    for ax in list(axes.flat)[count:]:
        ax.axis("off")
    return fig, axes


def plot_curves(plt, workdirs: list[Path], keys_arg: list[str] | None):
    runs = {}
    for workdir in workdirs:
        path = workdir / "metrics.jsonl"
        if not path.is_file():
            raise SystemExit(f"no metrics at {path}: is --workdir a vlp run directory?")
        runs[workdir.name] = load_series(path)
    available = sorted({k for series in runs.values() for k in series})
    keys = [k for k in (keys_arg or DEFAULT_KEYS) if k in available]
    if not keys:
        raise SystemExit(f"none of the keys {keys_arg or DEFAULT_KEYS} is in the metrics; available: {available}")
    fig, axes = _grid(plt, len(keys))
    for ax, key in zip(axes.flat, keys):
        for run, series in runs.items():
            if key in series:
                steps, values = series[key]
                ax.plot(steps, values, marker="o" if len(steps) < 20 else None, markersize=3, label=run)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(runs) > 1:
            ax.legend(fontsize=7)
    fig.suptitle(", ".join(runs))
    return fig


def plot_evals(plt, scores: dict[str, dict[str, float]], keys_arg: list[str] | None):
    metrics = sorted({k for s in scores.values() for k in s})
    metrics = [k for k in keys_arg if k in metrics] if keys_arg else metrics
    if not metrics:
        raise SystemExit(f"none of the keys {keys_arg} is in the eval results")
    fig, ax = plt.subplots(figsize=(max(6.0, 0.6 * len(metrics) * len(scores)), 4.0))
    width = 0.8 / len(scores)
    for i, (label, values) in enumerate(scores.items()):
        xs = [m + i * width for m in range(len(metrics))]
        bars = ax.bar(xs, [values.get(k, 0.0) for k in metrics], width, label=label)
        ax.bar_label(bars, fmt="%.3f", fontsize=6, rotation=90, padding=2)
    ax.set_xticks([m + 0.4 - width / 2 for m in range(len(metrics))], metrics, rotation=45, ha="right", fontsize=8)
    ax.set_ylim(0, 1.15 * max(max(v.values(), default=0.0) for v in scores.values()) or 1.0)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("evaluation results")
    return fig


def main(argv: list[str] | None = None) -> epath.Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", nargs="+", default=None, help="run directories with metrics.jsonl")
    parser.add_argument("--eval_json", nargs="+", default=None, help="tools/eval.py result files (bar chart)")
    parser.add_argument("--out", default=None, help="PNG path (default: <first workdir>/metrics.png)")
    parser.add_argument("--keys", nargs="*", default=None, help=f"metrics to plot (curves: default {DEFAULT_KEYS})")
    args = parser.parse_args(argv)
    if bool(args.workdir) == bool(args.eval_json):
        parser.error("give either --workdir (training curves) or --eval_json (evaluation results)")
    if args.eval_json and not args.out:
        parser.error("--eval_json needs --out")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if args.workdir:
        fig = plot_curves(plt, [epath.Path(w) for w in args.workdir], args.keys)
    else:
        fig = plot_evals(plt, load_eval_scores([epath.Path(p) for p in args.eval_json]), args.keys)
    fig.tight_layout()
    out = epath.Path(args.out) if args.out else epath.Path(args.workdir[0]) / "metrics.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    png = io.BytesIO()  # matplotlib writes local files only; epath writes to a workdir on gs:// too
    fig.savefig(png, format="png", dpi=110)
    out.write_bytes(png.getvalue())
    print(out)
    return out


if __name__ == "__main__":
    main()
