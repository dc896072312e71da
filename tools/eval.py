#!/usr/bin/env python
"""Evaluate a run's checkpoint: the evaluators of its config (zero-shot top-1/top-5, retrieval R@1/5/10 in both
directions, the dense probe's mIoU for masked-image objectives).

  python tools/eval.py --workdir=runs/x [--step=N] [--split=test] [--set evals.zeroshot.num_examples=500]
  python tools/eval.py --workdir=runs/clip --dense   # also the dense segmentation probe (dense_miou)

Prints one JSON line and writes it to <workdir>/eval_<split>_step<N>.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import add_config_args, quiet_library_logs, resolve_config  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest good one)")
    parser.add_argument("--split", default=None, help="evaluate every evaluator on this split (default: config's)")
    parser.add_argument("--out", default=None, help="JSON output path")
    parser.add_argument("--dense", action="store_true",
                        help="add the dense segmentation probe on frozen patch tokens (dense_miou) to the evals")
    args = parser.parse_args(argv)
    quiet_library_logs()

    from vlp.train import evaluation
    from vlp.train.restore import restore_run

    start = time.perf_counter()
    config = resolve_config(args)
    if args.dense:
        from vlp.eval.dense import default_eval

        with config.unlocked():
            config.evals.dense = default_eval()
    exp, step, state = restore_run(args.workdir, config=config, step=args.step)
    with exp.context():
        evaluators = evaluation.build_evaluators(exp.config, exp.objective, exp.mesh, split=args.split)
        results = evaluation.run_evaluators(evaluators, state.params)
    split = args.split or "config"
    record = {"step": step, "split": split, **dict(sorted(results.items())),
              "eval_seconds": round(time.perf_counter() - start, 2)}
    out = Path(args.out) if args.out else Path(args.workdir) / f"eval_{split}_step{step}.json"
    out.write_text(json.dumps(record, indent=2))
    print(json.dumps(record), flush=True)
    return record


if __name__ == "__main__":
    main()
